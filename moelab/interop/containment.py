"""Reading a model folder without leaving it.

A Hugging Face folder names its own files (shards in ``model.safetensors.index.json``) and may hold
symlinks, so a hostile or careless folder could make an import read ``/etc/passwd`` or a shard two
directories up and copy it into a run. Every file is therefore resolved (symlinks followed) and
must land inside the folder; names that climb (``..``) or are absolute are refused before any
resolution. The one allowed exception is the Hugging Face cache's own layout: files in
``models--org--name/snapshots/<rev>/`` are links into ``models--org--name/blobs/``, so a snapshot
folder may reach its repository's cache folder, and nothing beyond it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from moelab.interop.errors import InteropError


def allowed_root(folder: Path) -> Path:
    """The folder files may resolve into: ``folder`` itself, or the repository cache folder when
    ``folder`` is a Hugging Face cache snapshot (``models--*/snapshots/<rev>``)."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def check_name(name: object, source: str) -> str:
    """A file name read from a file (an index's shard name): a relative path that stays inside
    the folder. ``source`` names where the name came from, for the error."""
    if not isinstance(name, str) or not name:
        raise InteropError(f"{source} = {name!r} is invalid: must be a file name inside the folder")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or Path(name).is_absolute() or ".." in posix.parts:
        raise InteropError(f"{source} = {name!r} is refused: shard names must stay inside the "
                           "folder (no absolute paths, no '..'), nothing outside it is read")
    return name


def inside(folder: Path, name: str, what: str = "") -> Path:
    """``folder / name`` with symlinks resolved, refused when it resolves outside ``folder`` (or
    the cache repository of a snapshot). Missing files resolve to their would-be path."""
    check_name(name, what or f"{folder}: file name")
    root = allowed_root(folder)
    path = (folder / name).resolve()
    if path != root and root not in path.parents:
        raise InteropError(f"{folder / name} resolves to {path}, outside {root}: a file linked from "
                           "outside the folder is refused, nothing outside it is read")
    return path
