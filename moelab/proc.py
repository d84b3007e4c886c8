"""Child processes that die with their parent.

``moelab train --nproc`` starts torchrun, and ``moelab compare`` starts one trainer per unit, each
in a new session (so a Ctrl-C reaches the parent alone, which forwards one graceful stop). A
session of its own also means a parent killed with SIGKILL would leave the child running and
holding the run folder's lock. :func:`die_with_parent` closes that gap on Linux: the kernel sends
the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and SIGTERM is the graceful
stop (the trainer checkpoints and exits 75; torchrun forwards it to its workers). Elsewhere it is
a no-op.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1            # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` for ``subprocess.Popen`` that asks the kernel to send ``sig`` to the child
    when this process dies; None where the system has no such request (not Linux).

    The kernel ties the request to the thread that forks, so call Popen from the thread that
    lives as long as the child (the main thread here). A parent that died between the fork and
    the request is caught by comparing the child's parent pid with the one it was forked from."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def request() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:             # the parent is already gone
            os.kill(os.getpid(), sig)

    return request


# ---------------------------------------------------------------------------------------------
# ending a process whose native threads outlive the interpreter
# ---------------------------------------------------------------------------------------------

_NATIVE_THREADS: list[str] = []


def native_threads_outlive_interpreter(why: str) -> None:
    """Record that this process runs native threads that can call into Python after the
    interpreter has begun to finalize, so the CLI ends it with :func:`exit_process`.

    The case that needs it: gloo's worker threads (``pt_gloo_runloop``) stay alive after
    ``destroy_process_group`` (DTensor's caches and device meshes keep every process group
    referenced), and each releases a finished collective's tensors on its own thread. When the
    last tensor's Python object is released there, the thread takes the GIL; during
    ``Py_FinalizeEx`` CPython 3.11 answers that with ``pthread_exit``, whose forced unwind
    reaches the ``noexcept`` ``~AsyncWork`` destructor: ``std::terminate`` ("terminate called
    without an active exception", SIGABRT) after a run that finished."""
    if why not in _NATIVE_THREADS:
        _NATIVE_THREADS.append(why)


def exit_process(code: int) -> int:
    """Return ``code`` for a normal interpreter exit, or, once native threads were recorded,
    end the process here: run the ``atexit`` callbacks and flush the standard streams while the
    interpreter is whole, then ``os._exit(code)``, with no finalization for a thread to race."""
    if not _NATIVE_THREADS:
        return code
    import atexit
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
