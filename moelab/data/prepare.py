"""``prepare_data``: from a DataConfig to train/validation token streams and their tokenizer.

The one entry point the trainer calls. Each stage is cached by the fingerprints of what it was
made from, so a second run with the same corpus and vocab only re-reads the corpus (to hash it)
and maps the cached arrays:

    corpus (sha256) --split by path hash--> train docs --BPE--> tokenizer (sha256)
    train/val docs + tokenizer --encode_batch--> <cache>/tokens/*.bin memmaps
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from moelab.config import DataConfig
from moelab.data.cache import default_cache_dir
from moelab.data.corpus import CorpusInfo, load_corpus, split_documents
from moelab.data.tokenizer import (
    cached_bpe,
    find_eos_id,
    load_tokenizer_file,
    tokenizer_sha256,
    vocab_size_of,
)
from moelab.data.tokens import cached_tokens, token_dtype


@dataclass
class PreparedData:
    train_tokens: np.ndarray   # 1-D memmap, documents joined with eos_id
    val_tokens: np.ndarray
    tokenizer: Tokenizer
    tokenizer_json: str        # tokenizer.to_str(), for the run folder's tokenizer.json
    corpus: CorpusInfo
    eos_id: int


def split_key(corpus_sha256: str, val_fraction: float) -> str:
    """Names one train/validation split of one corpus: the split depends on both."""
    return hashlib.sha256(f"{corpus_sha256}|{val_fraction!r}".encode()).hexdigest()[:16]


def prepare_data(data: DataConfig, vocab_size: int, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> PreparedData:
    """Load the corpus, get a tokenizer (trained on the train split, or ``data.tokenizer``) and
    the train/validation token streams, each from the cache when it is there.

    ``vocab_size`` is the model's (``model.vocab_size``): a trained BPE gets at most that many
    tokens, and a user tokenizer with more is a DataError. Raises DataError for every problem a
    user can fix in the config.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    docs, info = load_corpus(data, log=log)
    train_docs, val_docs = split_documents(docs, data.val_fraction)
    split = split_key(info.sha256, data.val_fraction)

    if data.tokenizer is not None:
        tok = load_tokenizer_file(data.tokenizer, vocab_size)
        log(f"data: tokenizer {data.tokenizer} (vocab {vocab_size_of(tok)})")
    else:
        tok = cached_bpe([d.text for d in train_docs], vocab_size, split, cache, log)
    eos_id = find_eos_id(tok, data.tokenizer or "the trained tokenizer")
    tokenizer_json = tok.to_str()
    tok_sha = tokenizer_sha256(tok)
    dtype = token_dtype(vocab_size_of(tok))

    streams = {}
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        expect = {"corpus_sha256": info.sha256, "val_fraction": data.val_fraction,
                  "tokenizer_sha256": tok_sha, "split": name}
        path = cache / "tokens" / f"{split}-{tok_sha[:16]}-{name}.bin"
        texts = [d.text for d in split_docs]
        streams[name] = cached_tokens(path, tok, texts, eos_id, dtype, expect, log)
    log(f"data: {len(streams['train']):,} train tokens, {len(streams['val']):,} val tokens, "
        f"{info.num_bytes / max(len(streams['train']) + len(streams['val']), 1):.2f} bytes/token")
    return PreparedData(train_tokens=streams["train"], val_tokens=streams["val"], tokenizer=tok,
                        tokenizer_json=tokenizer_json, corpus=info, eos_id=eos_id)
