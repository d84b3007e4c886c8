"""Corpora: find the documents, skip what is not text, fingerprint them, split train/validation.

A corpus is a list of :class:`Document` (relative path, text) in a deterministic order, plus a
:class:`CorpusInfo` (source, sha256, sizes, skip counts) that a run records so it can say exactly
what it trained on. Sources, all named by ``data.corpus``:

* ``"stdlib"``: the interpreter's standard library (see :mod:`moelab.data.stdlib`);
* a text file: cut into line-aligned chunks of :data:`CHUNK_BYTES` (``name#0``, ``name#1``, ...),
  because one document could not be split into train and validation;
* a folder (recursively) or a glob: every file, sorted by relative path, hidden ones left out;
  ``.jsonl`` and ``.parquet`` files inside are read as records;
* a ``.jsonl`` file (field ``data.text_field``) or ``.parquet`` file (column ``data.text_field``):
  one document per record, named ``<file>#<index>``.

Files that are binary, empty or not UTF-8 are skipped and counted, never fatal. Validation
documents are chosen by a hash of the relative path (:func:`is_val_path`), not by position, so
adding, removing or reordering other documents never moves a document across the split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from moelab.config import DataConfig
from moelab.data.errors import DataError
from moelab.data.stdlib import is_generated, stdlib_dir, stdlib_files

CHUNK_BYTES = 64 * 1024
MAX_EXAMPLES = 3       # skipped paths kept per reason, for the log
GLOB_CHARS = "*?["


class Document(NamedTuple):
    relpath: str       # stable name: the split hash and the corpus sha256 both use it
    text: str


@dataclass
class CorpusInfo:
    source: str            # "stdlib:<path>" or the user path
    sha256: str            # over (relative path, bytes) of every document, in corpus order
    num_bytes: int         # UTF-8 bytes of the documents used (after data.max_bytes)
    num_docs: int
    num_train_docs: int
    num_val_docs: int
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    # A few skipped paths per reason, so a log can show what was left out and why.
    skipped_examples: dict[str, list[str]] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------
# train / validation split
# --------------------------------------------------------------------------------------------

def path_hash(relpath: str) -> float:
    """A number in [0, 1) that depends on the relative path only (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_val_path(relpath: str, val_fraction: float) -> bool:
    """The hash rule: a document is held out when its path hashes below ``val_fraction``."""
    return path_hash(relpath) < val_fraction


def val_mask(relpaths: list[str], val_fraction: float) -> list[bool]:
    """Which documents are validation documents, guaranteeing at least one of each kind.

    Small corpora (a ``data.max_bytes`` slice of 20 files at ``val_fraction=0.05``) often get no
    validation document from the hash rule alone. Then the document with the lowest hash is held
    out (and, symmetrically, the highest-hash document is kept for training when the rule takes
    them all): still a function of the paths only, never of their order.
    """
    if len(relpaths) < 2:
        raise ValueError("a split needs at least two documents")
    hashes = [path_hash(p) for p in relpaths]
    mask = [h < val_fraction for h in hashes]
    if not any(mask):
        mask[min(range(len(hashes)), key=hashes.__getitem__)] = True
    if all(mask):
        mask[max(range(len(hashes)), key=hashes.__getitem__)] = False
    return mask


def split_documents(docs: list[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
    """``(train, val)``, each in corpus order, by :func:`val_mask`."""
    mask = val_mask([d.relpath for d in docs], val_fraction)
    train = [d for d, v in zip(docs, mask) if not v]
    val = [d for d, v in zip(docs, mask) if v]
    return train, val


# --------------------------------------------------------------------------------------------
# collecting documents
# --------------------------------------------------------------------------------------------

class _Collector:
    """Accumulates documents in order: hashes them, counts skips and stops at ``max_bytes``."""

    def __init__(self, max_bytes: Optional[int]) -> None:
        self.docs: list[Document] = []
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.num_bytes = 0
        self.max_bytes = max_bytes
        self.record_keys: Optional[list[str]] = None   # fields of the first JSON record seen
        self._sha = hashlib.sha256()
        self._cut = False                              # the max_bytes budget is spent

    @property
    def full(self) -> bool:
        return self._cut

    def skip(self, relpath: str, reason: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(relpath)

    def add(self, relpath: str, text: str) -> None:
        if not text.strip():
            self.skip(relpath, "empty")
            return
        raw = text.encode("utf-8")
        if self.max_bytes is not None and self.num_bytes + len(raw) >= self.max_bytes:
            # Cut the last document so the slice is at most max_bytes; a cut inside a UTF-8
            # sequence drops the partial character.
            self._cut = True
            raw = raw[: self.max_bytes - self.num_bytes]
            text = raw.decode("utf-8", errors="ignore")
            raw = text.encode("utf-8")
            if not text.strip():
                return
        name = relpath.encode("utf-8")
        # Length-prefixed fields: no two different corpora can feed the hash the same bytes.
        self._sha.update(len(name).to_bytes(8, "little") + name + len(raw).to_bytes(8, "little"))
        self._sha.update(raw)
        self.docs.append(Document(relpath, text))
        self.num_bytes += len(raw)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def _decode(raw: bytes) -> tuple[Optional[str], str]:
    """``(text, "")`` for usable text, else ``(None, reason)``."""
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw:
        return None, "binary"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "non-utf8"


def _read_stdlib(out: _Collector) -> None:
    for relpath, path in stdlib_files():
        if out.full:
            return
        raw = path.read_bytes()
        if is_generated(raw):
            out.skip(relpath, "generated")
            continue
        text, reason = _decode(raw)
        if text is None:
            out.skip(relpath, reason)
        else:
            out.add(relpath, text)


def _read_text_file(path: Path, relpath: str, out: _Collector, chunk: bool = False) -> None:
    raw = path.read_bytes()
    text, reason = _decode(raw)
    if text is None:
        out.skip(relpath, reason)
    elif not chunk:
        out.add(relpath, text)
    else:
        for i, piece in enumerate(_line_chunks(raw, CHUNK_BYTES)):
            if out.full:
                return
            out.add(f"{relpath}#{i}", piece.decode("utf-8"))


def _line_chunks(raw: bytes, size: int) -> Iterator[bytes]:
    """Pieces of about ``size`` bytes that end at a newline (safe for UTF-8: a newline byte never
    sits inside a multi-byte character)."""
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start + size)
        end = len(raw) if end < 0 else end + 1
        yield raw[start:end]
        start = end


def _read_jsonl(path: Path, relpath: str, field_name: str, out: _Collector) -> None:
    with open(path, "rb") as f:
        for index, line in enumerate(f):
            if out.full:
                return
            name = f"{relpath}#{index}"
            if not line.strip():
                continue   # blank separator lines are not records
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                out.skip(name, "non-utf8")
                continue
            except json.JSONDecodeError:
                out.skip(name, "bad-json")
                continue
            if out.record_keys is None and isinstance(record, dict):
                out.record_keys = sorted(record)
            text = record.get(field_name) if isinstance(record, dict) else None
            if not isinstance(text, str):
                out.skip(name, "no-text-field")
                continue
            out.add(name, text)


def _read_parquet(path: Path, relpath: str, field_name: str, out: _Collector) -> None:
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pat
    except ImportError:
        raise DataError(f"data.corpus = {str(path)!r} is a .parquet file, which needs pyarrow: "
                        "pip install 'moelab[parquet]'") from None
    try:
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
    except Exception:  # pyarrow raises its own ArrowInvalid / OSError family
        out.skip(relpath, "bad-parquet")
        return
    if field_name not in schema.names:
        raise DataError(f"data.text_field = {field_name!r} is not a column of {str(path)!r} "
                        f"(columns: {', '.join(schema.names)})")
    kind = schema.field(field_name).type
    if not (pat.is_string(kind) or pat.is_large_string(kind)):
        raise DataError(f"data.text_field = {field_name!r} in {str(path)!r} is a {kind} column; "
                        "it must hold strings")
    index = 0
    for batch in table.iter_batches(columns=[field_name], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if out.full:
                return
            name = f"{relpath}#{index}"
            index += 1
            if text is None:
                out.skip(name, "empty")
            else:
                out.add(name, text)


def _read_file(path: Path, relpath: str, data: DataConfig, out: _Collector) -> None:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _read_jsonl(path, relpath, data.text_field, out)
    elif suffix == ".parquet":
        _read_parquet(path, relpath, data.text_field, out)
    else:
        _read_text_file(path, relpath, out)


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, in no particular order (callers sort)."""
    files = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(here) / n for n in names if not n.startswith(".")]
    return files


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading components without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _glob_files(pattern: str) -> list[Path]:
    """Files a glob matches, folders among the matches walked recursively, each once (``**``
    matches a folder and the files in it)."""
    files: set[Path] = set()
    for match in glob.glob(pattern, recursive=True):
        p = Path(match)
        files.update(_walk(p) if p.is_dir() else [p] if p.is_file() else [])
    return list(files)


def _read_user_corpus(data: DataConfig, out: _Collector) -> None:
    """A file, folder or glob (an existing path wins over a glob reading of its name)."""
    corpus = data.corpus
    path = Path(corpus).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".parquet"):
            _read_file(path, path.name, data, out)
        else:
            _read_text_file(path, path.name, out, chunk=True)
        return
    if path.is_dir():
        root, files = path, _walk(path)
    elif any(c in corpus for c in GLOB_CHARS):
        root, files = _glob_root(str(path)), _glob_files(str(path))
        if not files:
            raise DataError(f"data.corpus = {corpus!r} matches no files")
    else:
        raise DataError(f"data.corpus = {corpus!r} does not exist (expected 'stdlib', a text "
                        "file, a folder, a glob, or a .jsonl / .parquet file)")
    for relpath, f in sorted((f.relative_to(root).as_posix(), f) for f in files):
        if out.full:
            return
        _read_file(f, relpath, data, out)


def _describe_skips(skipped: Counter[str]) -> str:
    total = sum(skipped.values())
    detail = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    return f"skipped {total} ({detail})" if total else "nothing usable found"


def load_corpus(
    data: DataConfig, log: Optional[Callable[[str], None]] = None
) -> tuple[list[Document], CorpusInfo]:
    """Read the corpus ``data.corpus`` names (see the module docstring), at most
    ``data.max_bytes`` bytes of it, and split it by path hash with ``data.val_fraction``.

    Documents come back in corpus order (sorted paths, records in file order); which of them are
    validation documents is :func:`split_documents`'s answer. With ``log``, the corpus summary,
    skip counts and any split fallback are reported through it.
    """
    if not 0 < data.val_fraction < 1:
        raise DataError(f"data.val_fraction = {data.val_fraction!r} is invalid: must be in (0, 1)")
    if data.max_bytes is not None and data.max_bytes <= 0:
        raise DataError(f"data.max_bytes = {data.max_bytes!r} is invalid: must be > 0")
    out = _Collector(data.max_bytes)
    corpus = data.corpus
    if corpus == "stdlib":
        source = f"stdlib:{stdlib_dir()}"
        _read_stdlib(out)
    else:
        source = corpus
        _read_user_corpus(data, out)

    docs = out.docs
    if not docs and out.skipped["no-text-field"]:
        keys = ", ".join(out.record_keys or []) or "no fields"
        raise DataError(f"data.text_field = {data.text_field!r} is not a text field of the records "
                        f"in data.corpus = {corpus!r} (the first record has: {keys})")
    if not docs:
        raise DataError(f"data.corpus = {corpus!r} has no usable text: {_describe_skips(out.skipped)}")
    if len(docs) < 2:
        limit = f" within data.max_bytes = {data.max_bytes}" if data.max_bytes is not None else ""
        raise DataError(f"data.corpus = {corpus!r} gives only 1 document{limit}; at least 2 are "
                        "needed (one to train on, one to validate on): use a larger corpus"
                        f"{' or raise data.max_bytes' if limit else ''}")
    mask = val_mask([d.relpath for d in docs], data.val_fraction)
    info = CorpusInfo(
        source=source, sha256=out.sha256, num_bytes=out.num_bytes, num_docs=len(docs),
        num_train_docs=mask.count(False), num_val_docs=mask.count(True),
        skipped=dict(sorted(out.skipped.items())), skipped_examples=out.examples,
    )
    if log is not None:
        _log_corpus(info, docs, data, log)
    return docs, info


def _log_corpus(info: CorpusInfo, docs: list[Document], data: DataConfig,
                log: Callable[[str], None]) -> None:
    log(f"data: corpus {info.source}: {info.num_docs} docs ({info.num_train_docs} train / "
        f"{info.num_val_docs} val), {info.num_bytes / 1e6:.2f} MB, sha256 {info.sha256[:12]}")
    if info.skipped:
        examples = "; ".join(f"{reason}: {', '.join(paths)}"
                             for reason, paths in sorted(info.skipped_examples.items()))
        log(f"data: corpus: {_describe_skips(Counter(info.skipped))}, e.g. {examples}")
    by_hash = sum(is_val_path(d.relpath, data.val_fraction) for d in docs)
    if by_hash == 0:
        log("data: corpus: no document hashed into validation at data.val_fraction = "
            f"{data.val_fraction}; holding out the one with the lowest path hash")
    elif by_hash == len(docs):
        log(f"data: corpus: every document hashed into validation at data.val_fraction = "
            f"{data.val_fraction}; keeping the one with the highest path hash for training")
