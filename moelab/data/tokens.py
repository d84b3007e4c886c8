"""Token streams: documents encoded once, joined by end-of-text, cached as numpy memmaps.

A split is one flat array ``doc0 <eos> doc1 <eos> ...``; batches are windows into it. It is
written to ``<cache>/tokens/<name>.bin`` (raw little-endian ids) with a JSON sidecar holding
dtype, length and the fingerprints it was made from. The sidecar is written last and is the
commit mark: a ``.bin`` without a matching sidecar, or of the wrong size, is never trusted. Both
go through :func:`moelab.fileio.atomic_output`, so a killed run leaves no half file.

Ids are stored as ``uint16`` when the vocabulary fits (halving the cache and the page cache it
occupies), else ``uint32``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
from tokenizers import Tokenizer

from moelab.fileio import atomic_output, write_text_atomic

FORMAT = "moelab-tokens-1"
BATCH_BYTES = 1 << 20   # encode about 1 MB of text per encode_batch call: parallel, bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits in 16 bits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encode_many(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def encode_documents(tok: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype,
                     out: BinaryIO) -> int:
    """Write ``text0 <eos> text1 <eos> ...`` as ``dtype`` ids to ``out``; returns the token count.

    ``add_special_tokens=False`` keeps a user tokenizer's BOS/EOS template out of the stream: the
    only separator is the one end-of-text token added here.
    """
    total = 0
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size < BATCH_BYTES):
            size += len(texts[end])
            end += 1
        for ids in _encode_many(tok, texts[start:end]):
            ids.append(eos_id)
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            total += len(ids)
        start = end
    return total


def _sidecar(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


def open_tokens(bin_path: Path, expect: dict) -> Optional[np.memmap]:
    """The cached stream at ``bin_path`` if its sidecar matches ``expect`` and its size matches
    the recorded length, else None."""
    meta_path = _sidecar(bin_path)
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
    except (ValueError, KeyError, TypeError):
        return None
    if any(meta.get(k) != v for k, v in expect.items()) or length <= 0:
        return None
    if bin_path.stat().st_size != length * dtype.itemsize:
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,))


def cached_tokens(path: Path, tok: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype,
                  expect: dict, log: Callable[[str], None]) -> np.memmap:
    """The token stream of ``texts`` from the cache at ``path``, encoding and caching it first
    when there is no trusted copy. ``expect`` (fingerprints) goes into the sidecar and must
    match on load."""
    label = expect.get("split", path.stem)
    tokens = open_tokens(path, {**expect, "format": FORMAT, "dtype": dtype.name})
    if tokens is not None:
        log(f"data: {label} tokens from cache {path} ({len(tokens):,} tokens, {dtype.name})")
        return tokens
    start = time.perf_counter()
    # Drop the commit mark first: a kill between the two writes below then leaves no sidecar.
    _sidecar(path).unlink(missing_ok=True)
    with atomic_output(path) as f:
        length = encode_documents(tok, texts, eos_id, dtype, f)
    meta = {**expect, "format": FORMAT, "dtype": dtype.name, "length": length, "num_docs": len(texts)}
    write_text_atomic(_sidecar(path), json.dumps(meta, indent=2) + "\n")
    log(f"data: tokenised {label}: {len(texts)} docs -> {length:,} tokens ({dtype.name}) in "
        f"{time.perf_counter() - start:.1f} s")
    tokens = open_tokens(path, {**expect, "format": FORMAT, "dtype": dtype.name})
    if tokens is None:
        raise RuntimeError(f"token cache {path} is unreadable right after writing it")
    return tokens
