"""One writer per run folder: an exclusive OS file lock on ``FOLDER/.lock``.

The kernel releases the lock when the holding process dies, however it dies (kill -9 included),
so a crashed run never leaves a stale lock behind. While held, the file names its holder (pid,
host, start time, command) so that a second writer can be refused with who holds it. Opening the
lock file does not modify it, so a refused writer changes nothing in the folder.

POSIX ``flock`` (Linux, macOS); on Windows ``msvcrt.locking`` on the file's first byte. On network
file systems without lock support the lock may not hold across machines (as for any flock user).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


class FolderLock:
    def __init__(self, folder: str | Path, purpose: str = "writing"):
        self.folder = Path(folder)
        self.purpose = purpose
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)   # mode: what the umask gives
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
                   f"{', since ' + holder['started'] if holder.get('started') else ''}"
                   f"{': ' + holder['command'] if holder.get('command') else ''}")
            raise FolderLockedError(
                f"{str(self.folder)!r} is locked by another moelab process ({who}); one process "
                f"writes a run folder at a time. Wait for it to finish or stop it, or use another folder.")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
