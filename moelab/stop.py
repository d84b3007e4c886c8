"""Graceful stop: SIGTERM (what SLURM, Kubernetes and a shutting-down laptop send before killing a
job) and SIGINT (Ctrl-C) ask the training loop to finish its current step, write a checkpoint and
exit with :data:`EXIT_STOPPED`. A second signal exits at once; the checkpoint on disk is then the
previous one, intact, since every save is atomic.

Under torchrun a Ctrl-C reaches every process twice: once from the terminal and once forwarded by
torchrun itself. A repeat of the same signal within :data:`REPEAT_WINDOW_S` is therefore taken
as the same request there. A SIGTERM repeated within that window is always the same request: a
child started with :func:`moelab.proc.die_with_parent` gets its death signal once for every thread
of a multi-threaded parent as they exit (the kernel re-parents it to each surviving thread in
turn), so a killed ``moelab compare`` sends its trainer several SIGTERMs at the same instant, and a
scheduler's "exit now" is SIGKILL after a grace period, not a second SIGTERM.

While installed, SIGXFSZ is ignored, so that writing past a file-size limit fails with an OSError
the checkpoint code can report (instead of killing the process).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional

# "temporary failure, try again" (sysexits.h EX_TEMPFAIL): the run stopped on request with a
# checkpoint, and `--resume` continues it. Job schedulers can requeue on this status.
EXIT_STOPPED = 75
REPEAT_WINDOW_S = 2.0


class GracefulStop:
    def __init__(self, log: Callable[[str], None] = print, under_launcher: Optional[bool] = None):
        self.log = log
        self.requested = False
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
        self._signum: Optional[int] = None
        self._previous: dict = {}
        self.under_launcher = ("LOCAL_RANK" in os.environ) if under_launcher is None else under_launcher

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at, self._signum = True, now, signum
            self.signal_name = signal.Signals(signum).name
            self.log(f"{self.signal_name}: stopping after this step and saving a checkpoint "
                     "(send it again to exit at once)")
            return
        if signum == self._signum and now - self._first_at < REPEAT_WINDOW_S and \
                (self.under_launcher or signum == signal.SIGTERM):
            return                # the launcher forwarding it, or a dying parent's threads repeating it
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)                    # a second request: exit at once

    def install(self) -> "GracefulStop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:                         # not the main thread: leave signals alone
                return self
        if hasattr(signal, "SIGXFSZ"):
            self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


class StoppedByRequest(Exception):
    """Training stopped on a signal after writing a checkpoint; carries where to resume."""

    def __init__(self, message: str, run_dir: str):
        super().__init__(message)
        self.run_dir = run_dir
