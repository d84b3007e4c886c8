"""Files that are either complete or absent.

Checkpoints, run files and data caches are all written to a temporary name in the same folder,
flushed and fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX and
Windows). A run killed half way through a write leaves the previous file, never a half one.

``tempfile`` creates its files 0600 and folders 0700 whatever the umask, which would make every
run file private after the rename and break sharing runs on a cluster. So a new file gets the
mode a plain ``open`` would give (0666 minus the umask), a replaced file keeps the mode it had,
and temporary folders that become outputs get 0777 minus the umask.
"""

from __future__ import annotations

import json
import os
import stat
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc), else by
    setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The mode a rewrite of ``path`` gets: the existing file's, else what ``open`` would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def temp_dir_beside(dest: Path) -> Path:
    """An empty hidden folder beside ``dest`` (to be renamed to it), with the mode ``mkdir``
    would give rather than mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextmanager
def _replace_on_success(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block finishes, fsync it and rename it
    over ``path``. If the block raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)           # writers that recreate the file (safetensors) get it too
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


class JSONFileError(ValueError):
    """A file that should hold a JSON object does not; the message names the file and why."""


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``; JSONFileError (naming the file) when it is not valid JSON,
    not UTF-8 or not an object. The file must exist (callers say what a missing one means)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise JSONFileError(f"{path} does not hold a JSON object")
    return data
