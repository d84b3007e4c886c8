"""The tokens to route: a run's held-out split (or another corpus) read through ``moelab.data``
with the run's own tokenizer, cut into contiguous windows, each token with its category.

Legend: B windows per batch, T tokens per window, N tokens.

Windows are consecutive and never overlap, so every one of the N tokens is routed exactly once.
Categories are computed document by document as the windows reach them, so memory stays bounded
by one document and one batch whatever N is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from moelab.config import Config
from moelab.data import DataError, Document, load_corpus, prepare_data, split_documents
from moelab.inspect import categories as C
from moelab.inspect.errors import InspectError

Split = Literal["val", "train", "all"]
SPLITS = ("val", "train", "all")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Batch:
    x_BT: torch.Tensor                 # int64 input tokens
    y_BT: torch.Tensor                 # int64 next tokens
    cat_BT: Optional[torch.Tensor]     # int64 category of each input token; None without categories


@dataclass
class TokenSource:
    stream: np.ndarray                 # (N + 1,) at most: the split's first tokens, docs joined by eos
    tokenizer: Tokenizer
    eos_id: int
    docs: list[Document]               # the documents the stream holds, in order
    category_kind: str                 # "python", "file", "folder", "field:NAME" or "none"
    category_names: tuple[str, ...]
    description: str                   # e.g. "stdlib:/usr/lib/python3.11 (val split)"
    namer: Optional[Callable[[str], str]] = None   # relpath -> source category name

    @property
    def num_tokens(self) -> int:
        """Tokens that can be routed: every stream position that has a next token."""
        return max(0, len(self.stream) - 1)

    def batches(self, n_tokens: int, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """Consecutive windows of ``seq_len`` covering the first ``n_tokens`` tokens, grouped
        ``batch_size`` at a time (the last window may be shorter and then is a batch alone)."""
        n = min(n_tokens, self.num_tokens)
        cursor = _CategoryCursor(self) if self.category_kind != "none" else None
        starts = list(range(0, n, seq_len))
        i = 0
        while i < len(starts):
            length = min(seq_len, n - starts[i])
            group = [s for s in starts[i:i + batch_size] if min(seq_len, n - s) == length]
            i += len(group)
            idx_BT = np.asarray(group)[:, None] + np.arange(length + 1)          # (B, T+1)
            window = torch.from_numpy(np.asarray(self.stream[idx_BT], dtype=np.int64))
            cats = None
            if cursor is not None:
                cats = torch.from_numpy(np.stack([cursor.take(s, s + length) for s in group]))
            yield Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous(), cats)


class _CategoryCursor:
    """Category ids for increasing stream ranges, labelling one document at a time.

    Each document is re-encoded with the run's tokenizer (the offsets give each token its text)
    and checked against the cached stream, so a category can never be attached to the wrong
    token."""

    def __init__(self, source: TokenSource):
        self.src = source
        self.doc = 0
        self.base = 0                              # stream position of chunk[0]
        self.chunk = np.zeros(0, dtype=np.int64)
        self.index = {name: i for i, name in enumerate(source.category_names)}

    def _next_document(self) -> np.ndarray:
        src = self.src
        if self.doc >= len(src.docs):
            raise InspectError("the token stream runs past its documents: the token cache does not "
                               "match the corpus; delete the moelab cache (MOELAB_CACHE) and rerun")
        d = src.docs[self.doc]
        enc = src.tokenizer.encode(d.text, add_special_tokens=False)
        pos = self.base + len(self.chunk)
        n = len(enc.ids)
        have = np.asarray(src.stream[pos:pos + n + 1], dtype=np.int64)    # the doc and its eos
        want = np.asarray(enc.ids + [src.eos_id], dtype=np.int64)[:len(have)]
        if not np.array_equal(have, want):
            raise InspectError(f"document {d.relpath!r} does not re-encode to the cached token "
                               "stream; delete the moelab cache (MOELAB_CACHE) and rerun, or pass "
                               "--categories none")
        self.doc += 1
        if src.category_kind == "python":
            cats = C.token_categories(C.python_char_categories(d.text), enc.offsets)
            return np.append(cats, C.EOS)
        name = src.namer(d.relpath)
        cat = self.index.get(name, self.index.get(C.OTHER_SOURCES, 0))
        return np.full(n + 1, cat, dtype=np.int64)

    def take(self, start: int, end: int) -> np.ndarray:
        drop = start - self.base                   # positions before start are never asked again
        if drop > 0:
            self.chunk = self.chunk[drop:]
            self.base = start
        while self.base + len(self.chunk) < end:
            self.chunk = np.concatenate([self.chunk, self._next_document()])
        return self.chunk[start - self.base:end - self.base]


def run_tokenizer(run_dir: str | Path) -> Path:
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InspectError(f"RUN {str(run_dir)!r} has no {TOKENIZER_FILE}: inspect reads text with "
                           "the run's own tokenizer (copy the model's tokenizer.json into the run "
                           "folder)")
    return path


def open_source(run_dir: str | Path, cfg: Config, *, max_tokens: int, corpus: Optional[str] = None,
                split: Optional[Split] = None, categories: str = "auto",
                log: Callable[[str], None] = lambda m: None) -> TokenSource:
    """The first ``max_tokens`` (+1) tokens of ``split`` of the run's corpus (default: its
    validation split) or of ``corpus`` (default split there: all of it), tokenised with the run's
    tokenizer.json through :func:`moelab.data.prepare_data` and its cache."""
    tok_path = run_tokenizer(run_dir)
    data = dataclasses.replace(cfg.data, tokenizer=str(tok_path))
    if corpus is not None:
        data = dataclasses.replace(data, corpus=corpus)
    split = split or ("val" if corpus is None else "all")
    if split not in SPLITS:
        raise InspectError(f"--split = {split!r} is invalid: choose one of {', '.join(SPLITS)}")
    try:
        prep = prepare_data(data, cfg.model.vocab_size, log=log)
        docs, _ = load_corpus(data)
    except DataError as e:
        raise InspectError(f"--corpus {corpus!r}: {e}" if corpus is not None else str(e)) from None
    train_docs, val_docs = split_documents(docs, data.val_fraction)
    parts = {"val": [(prep.val_tokens, val_docs)], "train": [(prep.train_tokens, train_docs)],
             "all": [(prep.val_tokens, val_docs), (prep.train_tokens, train_docs)]}[split]
    stream, used_docs = _prefix(parts, max_tokens + 1)
    kind = _category_kind(categories, data.corpus, used_docs)
    namer = C.source_namer(kind, data.corpus) if kind not in ("python", "none") else None
    if kind == "python":
        names = C.PYTHON_CATEGORIES
    elif kind == "none":
        names = ()
    else:
        names = tuple(C.top_sources(used_docs, namer))
    return TokenSource(stream=stream, tokenizer=prep.tokenizer, eos_id=prep.eos_id, docs=used_docs,
                       category_kind=kind, category_names=names,
                       description=f"{prep.corpus.source} ({split} split)", namer=namer)


def _prefix(parts: list[tuple[np.ndarray, list[Document]]], length: int) -> tuple[np.ndarray, list[Document]]:
    """The first ``length`` tokens of the streams joined in order, and their documents (whole
    documents: the category labeller may read a little past the last token)."""
    pieces, docs, have = [], [], 0
    for tokens, part_docs in parts:
        if have >= length:
            break
        pieces.append(np.asarray(tokens[:length - have]))
        docs.extend(part_docs)
        have += len(pieces[-1])
    return np.concatenate(pieces), docs


def _category_kind(requested: str, corpus: str, docs: list[Document]) -> str:
    if requested == "auto":
        python = corpus == "stdlib" or all(C.source_file(d.relpath).endswith(".py") for d in docs)
        return "python" if python else "file"
    if requested in C.CATEGORY_KINDS or requested == "none":
        return requested
    if requested.startswith("field:") and len(requested) > len("field:"):
        if corpus == "stdlib":
            raise InspectError("--categories field:NAME needs a .jsonl corpus (--corpus); "
                               "the built-in corpus has no fields")
        return requested
    raise InspectError(f"--categories = {requested!r} is invalid: choose auto, python, file, folder, "
                       "field:NAME (a .jsonl field) or none")
