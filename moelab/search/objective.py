"""One Optuna trial end to end: draw a candidate, size it to the budget, train it (one run per seed,
each an ordinary run folder ``DIR/trials/trial-NNNN-s<seed>``), report the validation loss at every
evaluation, stop it when the pruner says so, and tell the study how it ended.

Everything the report needs is stored on the trial itself (Optuna user attributes ``arch``,
``result`` and ``worker``), so a report written anywhere covers trials trained by every worker of
a shared study, on any machine.

Objective ``loss``: the final validation loss (mean over the trial's seeds). ``loss_at_time``: the
validation loss at the wall-clock the base model needs for the budget, from the measured tokens/s:
a trial that trains at s tokens/s, against the base model's s_ref, has in that time seen
``budget x s / s_ref`` tokens, and its loss there is read off its evaluation curve (linear
interpolation; a trial faster than the base is scored at its full budget: the search does not
extrapolate a curve it has not measured). The pruner sees the loss per token in both cases.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from moelab.config import Config
from moelab.search.candidate import Candidate, Infeasible, counts, model_overrides, size
from moelab.search.space import SearchSpace, suggest
from moelab.search.trialrun import Interrupts, RunOutcome, train_and_follow

OBJECTIVES = ("loss", "loss_at_time")
TRIALS_DIR = "trials"
LOGS_DIR = "logs"


class SearchStopped(Exception):
    """A signal stopped the search; the trial in training is left running in the study (with a
    checkpoint) for ``--resume`` to continue."""


@dataclass
class TrialContext:
    """What every trial of this worker shares."""

    out_dir: Path
    base: Config                          # the base config, user overrides applied
    base_args: list[str]                  # its `moelab train` arguments (--preset/--config, --set ...)
    space: SearchSpace
    target_active: int
    budget_tokens: int
    train_overrides: list[str]            # the budget's train.* keys
    steps: int                            # training steps of one run
    seeds: list[int]
    objective: str = "loss"
    reference_tokens_per_s: Optional[float] = None
    interrupts: Interrupts = field(default_factory=Interrupts)
    log: Callable[[str], None] = print

    def unit(self, number: int, seed: int, sized: Config) -> dict:
        uid = f"trial-{number:04d}-s{seed}"
        sets = model_overrides(self.base.model, sized.model) + self.train_overrides + [f"train.seed={seed}"]
        return {"id": uid, "run_dir": str(self.out_dir / trial_dir(uid)),
                "train_args": self.base_args + sum((["--set", s] for s in sets), [])}


def trial_dir(uid: str) -> str:
    """A trial's run folder relative to the search folder, as results keep it, so the folder can
    be moved or read from another working directory (as compare.json stores its units)."""
    return f"{TRIALS_DIR}/{uid}"


def arch_key(cand: Candidate) -> str:
    return json.dumps(cand.key())


def _median_tps(run_dir: Path) -> Optional[float]:
    """tokens/s of a run without a summary (pruned): the median of its logged steps, as the
    trainer's summary takes it (first record left out: it includes warm-up)."""
    from moelab.runfolder import load_metrics
    tps = [r["tokens_per_s"] for r in load_metrics(run_dir) if r.get("kind") == "train"]
    return statistics.median(tps[1:] or tps) if tps else None


def score_at_time(evals: list[dict], tokens_per_s: float, reference_tokens_per_s: float,
                  budget_tokens: int) -> Optional[float]:
    """The loss at the tokens this run reaches in the base model's time for the budget."""
    from moelab.compare.analysis import interpolate
    if not evals or not tokens_per_s or not reference_tokens_per_s:
        return None
    reach = min(float(evals[-1]["tokens"]), budget_tokens * tokens_per_s / reference_tokens_per_s)
    return interpolate([float(e["tokens"]) for e in evals], [e["val_loss"] for e in evals], reach)


def _drop_checkpoints(run_dir: Path) -> None:
    from moelab.runfolder import checkpoint_dirs
    for ckpt in checkpoint_dirs(run_dir):
        shutil.rmtree(ckpt, ignore_errors=True)


def worker_attr(out_dir: Path) -> dict:
    import os
    return {"host": socket.gethostname(), "pid": os.getpid(), "out_dir": str(out_dir.resolve())}


def run_trial(ctx: TrialContext, study, trial) -> str:
    """Train ``trial`` (new or adopted) and tell the study; returns its final state name. Raises
    SearchStopped when a signal stopped the search (the trial stays running in the study)."""
    from optuna.trial import TrialState
    cand = suggest(trial, ctx.space, ctx.base.model.n_layers)
    try:
        sized = size(ctx.base, cand, ctx.target_active)
    except Infeasible as e:
        trial.set_user_attr("fail_reason", str(e))
        study.tell(trial, state=TrialState.FAIL)
        ctx.log(f"trial {trial.number}: not trained: {e}")
        return "fail"
    total, active = counts(sized)
    arch = {**cand.public(), "key": arch_key(cand), "expert_hidden": sized.model.moe.expert_hidden
            if not cand.dense else None, "ffn_hidden": sized.model.ffn_hidden,
            "active_params": active, "total_params": total}
    trial.set_user_attr("arch", arch)

    twin = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get("arch", {}).get("key") == arch["key"] and "result" in t.user_attrs), None)
    if twin is not None:
        # the same model at the same seeds trains to the same numbers: reuse them, train nothing
        trial.set_user_attr("result", {**twin.user_attrs["result"], "duplicate_of": twin.number})
        study.tell(trial, twin.value)
        ctx.log(f"trial {trial.number}: same model as trial {twin.number}, its result reused")
        return "complete"

    from moelab.search.candidate import describe_row
    ctx.log(f"trial {trial.number}: layers [{describe_row(cand, ctx.base.model.n_layers)}]"
            + ("" if cand.dense else f", top-{cand.top_k}, granularity {cand.granularity}, "
               f"{cand.shared_experts} shared, expert width {sized.model.moe.expert_hidden}")
            + f"; {active:,} active / {total:,} total parameters")
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    reported = set(frozen.intermediate_values)         # an adopted trial reported some already
    outcomes: list[RunOutcome] = []
    units = [ctx.unit(trial.number, seed, sized) for seed in ctx.seeds]
    for i, unit in enumerate(units):
        final_step = ctx.steps

        def on_eval(rec: dict, offset=i * ctx.steps, final_step=final_step) -> bool:
            if rec["step"] <= 0:
                return False
            key = offset + rec["step"]
            if key not in reported:
                trial.report(rec["val_loss"], key)
                reported.add(key)
            return rec["step"] < final_step and trial.should_prune()

        outcome = train_and_follow(unit, ctx.out_dir / LOGS_DIR / f"{unit['id']}.log", on_eval,
                                   ctx.interrupts, ctx.log)
        if outcome.state == "stopped":
            raise SearchStopped(f"stopped during trial {trial.number}")
        if outcome.state == "failed":
            trial.set_user_attr("fail_reason", f"training {unit['id']} failed (exit {outcome.exit_code})")
            study.tell(trial, state=TrialState.FAIL)
            ctx.log(f"trial {trial.number}: training failed (exit {outcome.exit_code}); log "
                    f"{ctx.out_dir / LOGS_DIR / (unit['id'] + '.log')}:\n{outcome.log_tail}")
            return "fail"
        outcomes.append(outcome)
        if outcome.state == "pruned":
            run_dir = Path(unit["run_dir"])
            _drop_checkpoints(run_dir)
            trial.set_user_attr("result", {
                "state": "pruned", "pruned_at_step": outcome.steps, "pruned_in_seed": ctx.seeds[i],
                "tokens_per_s": _median_tps(run_dir), "run_dirs": [trial_dir(u["id"]) for u in units[:i + 1]],
                "val_curve": _curve(outcome.evals), "val_loss": None})
            study.tell(trial, state=TrialState.PRUNED)
            ctx.log(f"trial {trial.number}: pruned at step {outcome.steps} of {ctx.steps}"
                    + (f" (seed {ctx.seeds[i]})" if len(ctx.seeds) > 1 else ""))
            return "pruned"

    summaries = [json.loads((Path(u["run_dir"]) / "summary.json").read_text(encoding="utf-8")) for u in units]
    losses = [s["val_loss"] for s in summaries]
    tps = [s["tokens_per_s"] for s in summaries]
    result = {
        "state": "complete", "val_loss": statistics.mean(losses), "val_loss_seeds": losses,
        "tokens_per_s": statistics.mean(tps), "train_time_s": statistics.mean(s["train_time_s"] for s in summaries),
        "tokens": summaries[0]["tokens"], "steps": summaries[0]["steps"],
        "run_dirs": [trial_dir(u["id"]) for u in units], "val_curve": _curve(outcomes[0].evals),
    }
    value = result["val_loss"]
    if ctx.objective == "loss_at_time":
        scores = [score_at_time(o.evals, s["tokens_per_s"], ctx.reference_tokens_per_s, ctx.budget_tokens)
                  for o, s in zip(outcomes, summaries)]
        value = statistics.mean(scores)
        result["val_loss_at_time"] = value
    trial.set_user_attr("result", result)
    study.tell(trial, value)
    ctx.log(f"trial {trial.number}: val loss {result['val_loss']:.4f}"
            + (f", at the base model's time {value:.4f}" if ctx.objective == "loss_at_time" else "")
            + f", {result['tokens_per_s']:,.0f} tokens/s")
    return "complete"


def _curve(evals: list[dict]) -> list[list[float]]:
    """[step, tokens, training seconds, val loss] per evaluation."""
    return [[e["step"], e["tokens"], round(e["elapsed_s"], 3), e["val_loss"]] for e in evals]
