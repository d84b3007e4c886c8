"""Files that are either complete or absent.

Checkpoints, run files and data caches are all written to a temporary name in the same folder,
flushed and fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX and
Windows). A run killed half way through a write leaves the previous file, never a half one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _replace_on_success(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block finishes, fsync it and rename it
    over ``path``. If the block raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` (for writers that want a path, like safetensors), then publish the
    result as ``path`` atomically."""
    with _replace_on_success(path) as tmp:
        write(tmp)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only if the ``with`` block finishes."""
    with _replace_on_success(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (detached, contiguous, on the CPU), written atomically.
    A failed write (a full disk) raises OSError naming the file, as other writes do."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    except SafetensorError as e:
        raise OSError(None, str(e), str(path)) from None
