"""One worker of a search from its settings to its report: open (or join) the study, time the base
model for ``--objective loss_at_time``, run trials until the study holds its count, then, when no
trial is left running anywhere, retrain the best pattern beside the fixed ones and write the final
report (an interim report otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from moelab.config import ConfigError


class SearchError(RuntimeError):
    """The search cannot go on (training failures, a failed timing run); the message says why."""


def context(settings: dict, out_dir: Path, interrupts, log: Callable[[str], None]):
    """The worker's shared trial settings, rebuilt from search.json."""
    from moelab import resolve_config
    from moelab.compare.plan import Budget, budget_overrides
    from moelab.search.objective import TrialContext
    from moelab.search.space import space_from_dict
    base = resolve_config(settings["base"], settings["overrides"])
    if base.to_dict() != settings["base_config"]:
        raise ConfigError(f"the base config {settings['base']!r} changed since this search started (a "
                          f"preset or file edited?); trials must train what the study started with")
    t = base.train
    train_overrides = budget_overrides(Budget(tokens=settings["budget_tokens"]), t.batch_size, t.seq_len)
    train_overrides += ["train.keep_checkpoints=1"]          # a finished trial keeps its final state only
    spec = settings["base"]
    base_args = (["--config", spec] if spec.endswith(".toml") else ["--preset", spec]) \
        + sum((["--set", o] for o in settings["overrides"]), [])
    return TrialContext(out_dir=out_dir, base=base, base_args=base_args,
                        space=space_from_dict(settings["space"], settings["n_layers"]),
                        target_active=settings["target_active_params"], budget_tokens=settings["budget_tokens"],
                        train_overrides=train_overrides, steps=settings["steps_per_run"], seeds=settings["seeds"],
                        objective=settings["objective"], interrupts=interrupts, log=log)


def eval_every(train_overrides: list[str]) -> int:
    return next(int(o.split("=")[1]) for o in train_overrides if o.startswith("train.eval_every="))


def reference_overrides(ctx) -> list[str]:
    """A short run of the base model for its tokens/s: the same batch, ``REFERENCE_STEPS`` steps."""
    from moelab.search.study import REFERENCE_STEPS
    t = ctx.base.train
    tokens = min(ctx.budget_tokens, REFERENCE_STEPS * t.batch_size * t.seq_len * t.grad_accum)
    return [f"train.max_tokens={tokens}", f"train.max_steps={REFERENCE_STEPS}", "train.log_every=1",
            f"train.eval_every={REFERENCE_STEPS}", "train.keep_checkpoints=1", f"train.seed={ctx.seeds[0]}"]


def write_report(settings: dict, out_dir: Path, log: Callable[[str], None] = print) -> int:
    """Rewrite the report from the study as it stands, training nothing: with the retrain's
    numbers when that retrain is complete."""
    from optuna.trial import TrialState
    from moelab.search import report
    from moelab.search.retrain import retrain
    from moelab.search.study import open_study
    from moelab.search.trialrun import Interrupts
    ctx = context(settings, out_dir, Interrupts(log=log), log)
    study, _ = open_study(settings, out_dir, ctx.steps, eval_every(ctx.train_overrides))
    retrained = None
    if settings["retrain_seeds"] and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) \
            and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        measure = "val_loss" if settings["objective"] == "loss" else "val_loss_at_equal_time"
        try:
            retrained = retrain(out_dir, ctx.base, study.best_trial.user_attrs["arch"],
                                settings["target_active_params"], settings["budget"], settings["retrain_seeds"],
                                measure, log, train=False)
        except RuntimeError as e:
            raise SearchError(str(e)) from None
    payload = report.build(study, settings, out_dir, retrained)
    report.print_summary(payload, out_dir)
    return 0


def run_search(settings: dict, out_dir: Path, *, pruner=None, log: Callable[[str], None] = print) -> int:
    """Work on the search in ``out_dir`` (its search.json written); returns the exit status: 0, or
    75 when a signal stopped it (``--resume`` continues). ``pruner`` replaces the settings' one
    (an ``optuna.pruners`` object)."""
    from optuna.trial import TrialState
    from moelab.compare.run import CompareStopped
    from moelab.lock import FolderLock, FolderLockedError
    from moelab.search import report
    from moelab.search.retrain import RETRAIN_DIR, retrain
    from moelab.search.study import open_study, reference_speed, run_worker
    from moelab.search.trialrun import Interrupts
    from moelab.stop import EXIT_STOPPED

    with Interrupts(log=log) as interrupts:
        ctx = context(settings, out_dir, interrupts, log)
        study, created = open_study(settings, out_dir, ctx.steps, eval_every(ctx.train_overrides), pruner)
        try:
            if settings["objective"] == "loss_at_time":
                unit = {"id": "reference-speed", "run_dir": str(out_dir / "reference-speed"),
                        "train_args": ctx.base_args + sum((["--set", o] for o in reference_overrides(ctx)), [])}
                ctx.reference_tokens_per_s = reference_speed(study, created, unit, out_dir, interrupts, log)
            result = None if interrupts.requested else run_worker(ctx, study, settings["trials"], log)
        except RuntimeError as e:
            raise SearchError(str(e)) from None
        if result is None or result.stopped:
            report.build(study, settings, out_dir, None)
            print(f"search stopped (the trial in training kept its checkpoint); continue with: "
                  f"moelab search --resume {out_dir}", file=sys.stderr)
            return EXIT_STOPPED
        retrained = None
        if result.running_elsewhere:
            log(f"trials {result.running_elsewhere} are still running in other workers: interim report; "
                f"when they finish, `moelab search --resume {out_dir}` retrains the best and writes the final one")
        elif settings["retrain_seeds"] and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            try:
                lock = FolderLock(out_dir / RETRAIN_DIR, "search retrain").acquire()
            except FolderLockedError as e:
                log(f"retrain skipped here: {e}")
                lock = None
            if lock is not None:
                try:
                    measure = "val_loss" if settings["objective"] == "loss" else "val_loss_at_equal_time"
                    retrained = retrain(out_dir, ctx.base, study.best_trial.user_attrs["arch"],
                                        settings["target_active_params"], settings["budget"],
                                        settings["retrain_seeds"], measure, log)
                except CompareStopped:
                    report.build(study, settings, out_dir, None)
                    print(f"search stopped during the retrain; continue with: moelab search --resume {out_dir}",
                          file=sys.stderr)
                    return EXIT_STOPPED
                except RuntimeError as e:
                    raise SearchError(str(e)) from None
                finally:
                    lock.release()
    payload = report.build(study, settings, out_dir, retrained)
    report.print_summary(payload, out_dir)
    return 0
