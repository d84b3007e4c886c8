"""The search's settings, its Optuna storage and study, and the loop each worker runs.

Settings: ``DIR/search.json`` holds what was asked (base config, budget, space, trials, storage,
study name, objective, pruner, seeds), so ``moelab search --resume DIR`` needs nothing else. The
study keeps the part that must agree between workers (``moelab_search`` user attribute): a process
that joins a study with other settings is refused, naming the first one that differs.

Storage: any Optuna RDB URL; by default ``sqlite:///DIR/search.db``. Several processes or machines
pointed at one URL and study name share the study: each asks Optuna for the next trial, and trial
numbers come from the storage, so no two workers train the same trial. A worker stops asking once
the study holds ``--trials`` trials that count (a trial that reused an earlier one's result does
not); a trial asked when the trials before it already make the count (two workers asking at the
same moment) is marked failed at once and never trained.

Resume: a worker holds an OS lock (``DIR/claims/trial-NNNN/.lock``) on every trial it trains. A
trial the study lists as running whose worker was this folder's and whose lock is free lost its
process (killed, or stopped by a signal): ``--resume DIR`` adopts it, continuing its runs from
their checkpoints, before asking for new trials. A finished run is never trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from moelab.config import ConfigError
from moelab.fileio import JSONFileError, read_json_object

SETTINGS_FILE = "search.json"
SETTINGS_VERSION = 1
DEFAULT_STUDY = "moelab-search"
STUDY_ATTR = "moelab_search"
REFERENCE_ATTR = "reference_tokens_per_s"
CLAIMS_DIR = "claims"
PRUNERS = ("hyperband", "sh", "median", "none")
REFERENCE_STEPS = 40          # steps of the base model timed for --objective loss_at_time
# settings every worker of one study must share (the rest, e.g. --retrain-seeds, is per process)
SHARED = ("base_config", "budget_tokens", "trials", "space", "objective", "seeds", "pruner",
          "target_active_params")


def write_settings(settings: dict, out_dir: Path) -> None:
    from moelab.compare.plan import write_json
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SETTINGS_FILE, settings)


def load_settings(out_dir: Path) -> dict:
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {str(out_dir)!r}: not a search folder (no {SETTINGS_FILE})")
    try:
        settings = read_json_object(path)
    except JSONFileError as e:
        raise ConfigError(f"--resume {str(out_dir)!r}: {e}") from None
    if settings.get("version") != SETTINGS_VERSION:
        raise ConfigError(f"--resume {str(out_dir)!r}: written by another moelab search version "
                          f"({settings.get('version')}); start a new search")
    return settings


def storage_url(settings: dict, out_dir: Path) -> str:
    return settings["storage"] or f"sqlite:///{(out_dir / 'search.db').resolve()}"


def public_url(url: str) -> str:
    """The URL with any password hidden, for reports and logs."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return url


def open_storage(url: str):
    """An Optuna RDB storage. SQLite waits up to a minute for a lock held by another worker
    instead of failing at once; creating the tables is retried, since two workers starting
    together may both try."""
    import optuna
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    last = None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:         # noqa: BLE001 - sqlalchemy's errors differ by backend
            last = e
            if "sqlite" not in url and attempt >= 1:
                break
            time.sleep(1.0 + attempt)
    raise ConfigError(f"--storage {public_url(url)!r}: cannot open it as an Optuna storage ({last})")


def make_pruner(name: str, steps: int, eval_every: int, n_seeds: int):
    """Pruners on the validation loss reported at each evaluation (steps are training steps; a
    trial of several seeds reports seed i at i x steps + step). Nothing is pruned before the second
    evaluation: the first is too early to tell models apart."""
    import optuna
    first = max(1, 2 * eval_every)
    if name == "hyperband":      # Li et al. 2018: successive halving over brackets of aggressiveness
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=steps * n_seeds,
                                              reduction_factor=3)
    if name == "sh":             # successive halving (Jamieson & Talwalkar 2016), rungs at 2e, 6e, 18e...
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=first)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner = {name!r} is invalid: must be one of {', '.join(PRUNERS)}")


def make_sampler(trials: int, seed: int):
    """TPE (Bergstra et al. 2011; Optuna's default), random for the first trials; constant liar
    so parallel workers do not all propose the point the others are already training."""
    import optuna
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, trials),
                                      constant_liar=True)


def _worker_seed(base_seed: int, creator: bool, existing: int) -> int:
    """The creator of a new study samples from the config's seed (a one-process search is
    reproducible); every other worker, and a resumed one, from a seed of its own, or it would
    propose the same random points again."""
    if creator and existing == 0:
        return base_seed
    text = f"{base_seed}-{existing}-{os.getpid()}-{socket.gethostname()}-{time.time_ns()}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def open_study(settings: dict, out_dir: Path, steps: int, eval_every: int, pruner=None):
    """Create the study or join it (checking the shared settings); returns (study, created)."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError
    url = storage_url(settings, out_dir)
    storage = open_storage(url)
    shared = {k: settings[k] for k in SHARED}
    base_seed = settings["base_config"]["train"]["seed"]
    pruner = pruner or make_pruner(settings["pruner"], steps, eval_every, len(settings["seeds"]))
    try:
        study = optuna.create_study(storage=storage, study_name=settings["study"], direction="minimize",
                                    sampler=make_sampler(settings["trials"], base_seed), pruner=pruner)
        study.set_user_attr(STUDY_ATTR, shared)
        return study, True
    except DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=settings["study"], storage=storage, pruner=pruner)
    theirs = None
    for _ in range(30):              # a creator that started a moment ago may not have stored them yet
        theirs = study.user_attrs.get(STUDY_ATTR)
        if theirs is not None:
            break
        time.sleep(1.0)
    if theirs is None:
        raise ConfigError(f"--study {settings['study']!r} in {public_url(url)} is not a moelab search "
                          f"study; choose another --study name")
    for key in SHARED:
        if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(shared[key], sort_keys=True):
            raise ConfigError(f"--study {settings['study']!r} in {public_url(url)} was started with "
                              f"another {key} ({_short(theirs.get(key))} there, {_short(shared[key])} "
                              f"here); join it with the same settings, or use another --study name")
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(settings["trials"], _worker_seed(base_seed, False, existing))
    return study, False


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else f"a different value (sha256 {hashlib.sha256(text.encode()).hexdigest()[:10]})"


def reference_speed(study, created: bool, unit: dict, out_dir: Path, interrupts, log) -> Optional[float]:
    """tokens/s of the base model, for --objective loss_at_time: the study's creator trains it for
    a few steps (``DIR/reference-speed``; a creator stopped meanwhile finishes it on --resume);
    other workers read it from the study."""
    from moelab.search.trialrun import train_and_follow
    tps = study.user_attrs.get(REFERENCE_ATTR)
    if tps is not None:
        return tps
    if created or Path(unit["run_dir"]).is_dir():
        outcome = train_and_follow(unit, out_dir / "logs" / "reference-speed.log", lambda _r: False,
                                   interrupts, log)
        if outcome.state == "stopped":
            return None
        if outcome.state != "finished":
            raise RuntimeError(f"timing the base model failed (exit {outcome.exit_code}):\n{outcome.log_tail}")
        tps = json.loads((Path(unit["run_dir"]) / "summary.json").read_text(encoding="utf-8"))["tokens_per_s"]
        study.set_user_attr(REFERENCE_ATTR, tps)
        log(f"base model: {tps:,.0f} tokens/s (the time every trial is scored at)")
        return tps
    for _ in range(600):
        tps = study.user_attrs.get(REFERENCE_ATTR)
        if tps is not None or interrupts.requested:
            return tps
        time.sleep(1.0)
    raise RuntimeError("the study's creator has not stored the base model's tokens/s after 10 minutes")


@dataclass
class WorkerResult:
    trained: list[int]           # trial numbers this worker finished (complete, pruned or failed)
    stopped: bool                # a signal stopped it
    running_elsewhere: list[int]


BEYOND = "beyond --trials"


def counts_toward(t) -> bool:
    """Whether a trial counts toward --trials: not one that reused an earlier trial's result (TPE
    proposing a model already trained to the end), nor one asked beyond the count. Repeats are
    capped: a worker stops at 2 x --trials trials in all."""
    return ((t.user_attrs.get("result") or {}).get("duplicate_of") is None
            and not t.user_attrs.get("fail_reason", "").startswith(BEYOND))


def _claim(out_dir: Path, number: int):
    from moelab.lock import FolderLock
    return FolderLock(out_dir / CLAIMS_DIR / f"trial-{number:04d}", "search trial")


def orphans(study, out_dir: Path) -> list:
    """Running trials this folder's workers started whose process is gone (their claim is free)."""
    from optuna.trial import TrialState
    me = {"host": socket.gethostname(), "out_dir": str(out_dir.resolve())}
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if all(t.user_attrs.get("worker", {}).get(k) == v for k, v in me.items())]


def run_worker(ctx, study, trials: int, log: Callable[[str], None]) -> WorkerResult:
    """Adopt this folder's orphaned trials, then ask for new ones until the study holds
    ``trials``; one trial at a time, each claimed by an OS lock while it trains."""
    import optuna
    from optuna.trial import TrialState
    from moelab.lock import FolderLockedError
    from moelab.search.objective import SearchStopped, run_trial, worker_attr
    done: list[int] = []
    stopped = False
    try:
        for frozen in orphans(study, ctx.out_dir):
            try:
                claim = _claim(ctx.out_dir, frozen.number).acquire()
            except FolderLockedError:
                continue                       # another worker of this folder trains it
            try:
                log(f"trial {frozen.number}: continuing it (its process stopped before it finished)")
                trial = optuna.trial.Trial(study, frozen._trial_id)
                trial.set_user_attr("worker", worker_attr(ctx.out_dir))
                run_trial(ctx, study, trial)
                done.append(frozen.number)
            finally:
                claim.release()
        failures = 0
        while not ctx.interrupts.requested:
            existing = study.get_trials(deepcopy=False)
            if sum(map(counts_toward, existing)) >= trials or len(existing) >= 2 * trials:
                break
            trial = study.ask()
            trial.set_user_attr("worker", worker_attr(ctx.out_dir))
            # numbers come from the storage: the trials before this one decide whether it is needed
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
            if sum(map(counts_toward, earlier)) >= trials or trial.number >= 2 * trials:
                trial.set_user_attr("fail_reason", f"{BEYOND} {trials} (asked at the same moment as "
                                                   f"another worker); not trained")
                study.tell(trial, state=TrialState.FAIL)
                break
            claim = _claim(ctx.out_dir, trial.number).acquire()
            try:
                state = run_trial(ctx, study, trial)
            finally:
                claim.release()
            done.append(trial.number)
            failures = failures + 1 if state == "fail" else 0
            if failures >= 3:
                raise RuntimeError("three trials in a row failed; see the logs above and "
                                   f"{ctx.out_dir / 'logs'}")
    except SearchStopped:
        stopped = True
    stopped = stopped or ctx.interrupts.requested
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    return WorkerResult(done, stopped, running)
