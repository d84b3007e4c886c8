"""Cache files that are either complete or absent.

Tokenizers and token streams are cached across runs. A run killed half way through writing one
must not leave a file that the next run trusts, so every cache file is written to a temporary
name in the same folder, flushed to disk, then renamed over the final name (``os.replace`` is
atomic on POSIX and Windows). Readers only ever see the old file or the whole new one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def default_cache_dir() -> Path:
    """``$MOELAB_CACHE`` if set, else ``~/.cache/moelab``."""
    env = os.environ.get("MOELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the ``with`` block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))
