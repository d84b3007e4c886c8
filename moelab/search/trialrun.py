"""One training run of a trial: a ``python -m moelab train`` process, followed through the
metrics.jsonl it writes, and stopped when the pruner says so.

The trainer is not changed for the search: it already logs an ``eval`` record (step, tokens,
training seconds, validation loss) at every evaluation, and on SIGTERM it finishes its step,
writes a checkpoint and exits with status 75. So the search reads each new eval record as it
appears, reports it to Optuna, and sends SIGTERM when the trial should be pruned; the step the run
stopped at is the last one it logged.

The process runs in its own session (a Ctrl-C on the terminal reaches the search alone, which
passes one SIGTERM on, as `moelab compare` does) and, on Linux, asks the kernel to send it SIGTERM
if the search process dies (``moelab.proc.die_with_parent``: ``PR_SET_PDEATHSIG``), so a killed
search leaves no training behind: the run checkpoints and ``moelab search --resume`` continues it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

POLL_S = 0.2              # how often metrics.jsonl is read while a run trains
LOCK_WAIT_LOG_S = 30.0


@dataclass
class RunOutcome:
    state: str                     # "finished", "pruned", "stopped" (the search was asked to stop), "failed"
    steps: int                     # the last training step the run logged
    exit_code: Optional[int] = None
    log_tail: str = ""
    evals: list = field(default_factory=list)     # every eval record of the run


class Interrupts:
    """SIGTERM / SIGINT to the search: the first stops the run in training (one SIGTERM passed on:
    it checkpoints and exits) and asks the search to stop; a second kills the run at once."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.requested = False
        self.child: Optional[subprocess.Popen] = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if not self.requested:
            self.requested = True
            self.log(f"{signal.Signals(signum).name}: the run in training checkpoints and the search "
                     "stops (again to kill the run at once)")
            if self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)
        elif self.child is not None and self.child.poll() is None:
            self.child.kill()

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False


class MetricsFollower:
    """New eval records of a run's metrics.jsonl, each returned once. A resumed run truncates the
    file back to its checkpoint and logs those steps again: steps already seen are skipped."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = 0
        self.seen: set[int] = set()
        self.last_step = 0
        self.evals: list[dict] = []

    def poll(self) -> list[dict]:
        if not self.path.is_file():
            return []
        size = self.path.stat().st_size
        if size < self.offset:               # rewritten by a resume
            self.offset = 0
        with open(self.path, "r", encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n")
        if end < 0:
            return []
        self.offset += len(chunk[:end + 1].encode("utf-8"))
        new = []
        for line in chunk[:end + 1].splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            self.last_step = max(self.last_step, int(rec.get("step", 0)))
            if rec.get("kind") == "eval" and rec["step"] not in self.seen:
                self.seen.add(rec["step"])
                self.evals.append(rec)
                new.append(rec)
        return new


def _wait_for_folder(run_dir: Path, log: Callable[[str], None], interrupts: Interrupts) -> bool:
    """Wait while another process (a trainer left from an earlier search process) holds the run
    folder; False if the search was asked to stop meanwhile."""
    from moelab.lock import FolderLock, FolderLockedError
    if not run_dir.is_dir():
        return True
    said = 0.0
    while True:
        try:
            FolderLock(run_dir, "search check").acquire().release()
            return True
        except FolderLockedError as e:
            if time.monotonic() - said > LOCK_WAIT_LOG_S:
                log(f"waiting: {e}")
                said = time.monotonic()
        if interrupts.requested:
            return False
        time.sleep(1.0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def train_and_follow(unit: dict, log_path: Path, on_eval: Callable[[dict], bool], interrupts: Interrupts,
                     log: Callable[[str], None] = print) -> RunOutcome:
    """Train ``unit`` (compare's unit shape: id, run_dir, train_args) to its end, or resume it, or
    only read it back when it finished earlier. ``on_eval(record)`` is called once per new eval
    record; when it returns True the run is sent SIGTERM and the outcome is "pruned"."""
    from moelab.compare.run import UnitState, train_command, unit_state
    from moelab.fileio import open_no_follow
    from moelab.proc import die_with_parent
    from moelab.stop import EXIT_STOPPED
    run_dir = Path(unit["run_dir"])
    follower = MetricsFollower(run_dir)
    state = unit_state(run_dir)
    if state is UnitState.FINISHED:
        for rec in follower.poll():
            on_eval(rec)                     # its reports, for the pruner's record; no decision left
        return RunOutcome("finished", follower.last_step, 0, evals=follower.evals)
    if not _wait_for_folder(run_dir, log, interrupts):
        return RunOutcome("stopped", follower.last_step)
    state = unit_state(run_dir)              # the other process may have finished it meanwhile
    if state is UnitState.FINISHED:
        return train_and_follow(unit, log_path, on_eval, interrupts, log)
    args = train_command(unit, run_dir, state, show_progress=False)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pruned = False
    # appended in place: a link there would lead the log out of the search folder
    fd = open_no_follow(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with open(fd, "a", encoding="utf-8") as out:
        out.write(f"$ moelab {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "moelab", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent())
        interrupts.child = proc
        try:
            while True:
                done = proc.poll() is not None
                for rec in follower.poll():
                    if on_eval(rec) and not pruned and not interrupts.requested and proc.poll() is None:
                        pruned = True
                        proc.send_signal(signal.SIGTERM)
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            interrupts.child = None
    code = proc.returncode
    if pruned and code in (0, EXIT_STOPPED):
        return RunOutcome("pruned", follower.last_step, code, evals=follower.evals)
    if code == 0:
        return RunOutcome("finished", follower.last_step, code, evals=follower.evals)
    if interrupts.requested:
        return RunOutcome("stopped", follower.last_step, code, evals=follower.evals)
    return RunOutcome("failed", follower.last_step, code, _tail(log_path), follower.evals)
