"""Train the units of a plan, one ``python -m moelab train`` process each, one after another.

A process per unit keeps each run's peak memory its own and leaves the trainer in charge of its
run folder (checkpoints, resume, its own logs). Units run budget by budget, and within a budget
seed by seed, each seed training every model in turn: a slow spell on a shared machine then
falls on all models alike rather than on one, and a compare killed part way has whole seeds done.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Callable

from moelab.runfolder import SUMMARY_FILE, checkpoint_dirs


class UnitState(str, Enum):
    FINISHED = "finished"      # summary.json written: never trained again
    RESUMABLE = "resumable"    # has a checkpoint: continues from it
    NEW = "new"


def unit_state(run_dir: str | Path) -> UnitState:
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY_FILE).is_file():
        return UnitState.FINISHED
    if checkpoint_dirs(run_dir):
        return UnitState.RESUMABLE
    return UnitState.NEW


def train_command(unit: dict, state: UnitState, show_progress: bool | None, nproc: int = 1,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The ``moelab train`` argument list for a unit that still needs training (``extra``:
    output options such as --quiet, --log-file F, --quiet-data)."""
    if state is UnitState.RESUMABLE:
        args = ["train", "--resume", unit["run_dir"]]
    else:
        args = ["train", "--out", unit["run_dir"], *unit["train_args"]]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    if show_progress is False:
        args.append("--no-progress")
    return args + list(extra)


class CompareStopped(Exception):
    """A signal stopped the compare; the unit in training saved a checkpoint (or was finished)."""


def run_units(plan: dict, out_dir: Path, *, show_progress: bool | None = None,
              log: Callable[[str], None] = print, extra_args: tuple[str, ...] = ()) -> None:
    """Train every unit that is not finished; a failure stops the compare with a message that
    says how to continue. Every unit prepares the same data: only the first one trained here
    prints that preamble."""
    units = plan["units"]
    trained = 0
    for i, unit in enumerate(units, 1):
        state = unit_state(unit["run_dir"])
        tag = f"[{i}/{len(units)}] {unit['id']}"
        if state is UnitState.FINISHED:
            log(f"{tag}: finished earlier, skipped")
            continue
        log(f"{tag}: {'resuming from its last checkpoint' if state is UnitState.RESUMABLE else 'training'}"
            f" ({unit['model']}, seed {unit['seed']}, budget {unit['budget']})")
        extra = tuple(extra_args) + (("--quiet-data",) if trained else ())
        code, stopped = _train(train_command(unit, state, show_progress, plan.get("nproc", 1), extra))
        trained += 1
        if stopped:
            raise CompareStopped(f"compare stopped during {unit['id']} (its last checkpoint is kept); "
                                 f"continue with: moelab compare --resume {out_dir}")
        if code != 0:
            raise RuntimeError(f"training {unit['id']} failed (exit {code}); fix the cause "
                               f"and run `moelab compare --resume {out_dir}`: finished units are kept")


def _train(args: list[str]) -> tuple[int, bool]:
    """Run ``python -m moelab <args>`` and wait; returns (exit status, stopped by a signal).

    The training process runs in its own session, so a Ctrl-C reaches compare alone, which passes
    one SIGTERM on: the trainer finishes its step, checkpoints and exits (status 75). A second
    signal kills it at once; its previous checkpoint stays intact."""
    from moelab.stop import EXIT_STOPPED
    proc = subprocess.Popen([sys.executable, "-m", "moelab", *args], start_new_session=True)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait(), False
    requested = []

    def forward(signum, _frame):
        if not requested:
            print(f"{signal.Signals(signum).name}: the model in training checkpoints and stops "
                  "(again to kill it at once)", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()
        requested.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, bool(requested) or code == EXIT_STOPPED
