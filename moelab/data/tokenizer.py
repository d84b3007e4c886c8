"""Tokenizers: a byte-level BPE trained on the corpus, or any ``tokenizer.json`` the user names.

Byte-level BPE (GPT-2 style) never meets an unknown character, so any UTF-8 text encodes, and with
no normalizer and ``add_prefix_space=False`` it round-trips exactly: ``decode(encode(s)) == s``,
indentation and newlines included, which matters for a corpus of source code.

The trained BPE always holds two special tokens: end-of-text (id 0), which joins documents, and
a mask token (id 1), which the masked LM (``train.objective = "mlm"``) puts in place of the tokens
it hides. Reserving the mask token in every trained BPE keeps one tokenizer per corpus, so causal
and masked models trained on the same corpus share ids; a causal model just never sees it.

A trained tokenizer is cached under ``<cache>/tokenizers/`` by corpus sha256, split and vocab
size, so a second run loads it instead of retraining. It is trained on the train split only: the
validation documents must not shape the vocabulary the model is evaluated with.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.fileio import write_text_atomic
from moelab.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-text spellings of common tokenizer.json files, tried in order for a user tokenizer.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
MASK_TOKEN = "<|mask|>"
# Mask spellings of common tokenizer.json files (BERT, RoBERTa), tried in order for a user tokenizer.
MASK_CANDIDATES = (MASK_TOKEN, "[MASK]", "<mask>")
# Changing how the BPE is trained must not reuse tokenizers cached by the old recipe
# (v2: the mask token joined end-of-text as a special token).
RECIPE = "bpe-bytelevel-v2"
MIN_VOCAB = 258   # 256 byte symbols + end-of-text + mask


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE: bytes in, merges learned later, exact decoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (fewer when the text runs out of merges),
    the end-of-text token first (id 0), the mask token second (id 1)."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"model.vocab_size = {vocab_size} is too small for a byte-level BPE: "
                        f"must be >= {MIN_VOCAB} (256 bytes + end-of-text + mask)")
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def tokenizer_sha256(tok: Tokenizer) -> str:
    """Fingerprint of the tokenizer's full JSON (vocab, merges, pre-tokenizer, specials)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def vocab_size_of(tok: Tokenizer) -> int:
    """Ids a model must embed: the base vocab plus added (special) tokens."""
    return tok.get_vocab_size(with_added_tokens=True)


def find_eos_id(tok: Tokenizer, source: str) -> int:
    """The id of the tokenizer's end-of-text token, or a DataError naming ``source``."""
    for name in EOS_CANDIDATES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise DataError(f"{source} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); "
                    "documents are joined with one")


def find_mask_id(tok: Tokenizer) -> Optional[int]:
    """The id of the tokenizer's mask token, or None when it has none (only the masked LM needs
    one, and says so)."""
    for name in MASK_CANDIDATES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer_file(path: str | Path, vocab_size: int) -> Tokenizer:
    """A user's ``tokenizer.json`` (``data.tokenizer``), checked to fit the model's vocab."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer = {str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise DataError(f"data.tokenizer = {str(path)!r} is not a readable tokenizer.json: "
                        f"{e}") from None
    size = vocab_size_of(tok)
    if size > vocab_size:
        raise DataError(f"model.vocab_size = {vocab_size} is smaller than the vocabulary of "
                        f"data.tokenizer = {str(path)!r} ({size} tokens): "
                        f"set model.vocab_size >= {size}")
    find_eos_id(tok, f"data.tokenizer = {str(path)!r}")
    return tok


def cached_bpe(train_texts: list[str], vocab_size: int, key: str, cache_dir: Path,
               log: Callable[[str], None]) -> Tokenizer:
    """Load the BPE cached under ``key`` (corpus sha + split + vocab), else train and cache it."""
    path = cache_dir / "tokenizers" / f"{RECIPE}-{vocab_size}-{key}.json"
    tok = _read_cached(path, log)
    if tok is not None:
        log(f"data: tokenizer from cache {path} (vocab {vocab_size_of(tok)})")
        return tok
    start = time.perf_counter()
    tok = train_bpe(train_texts, vocab_size)
    write_text_atomic(path, tok.to_str())
    log(f"data: trained byte-level BPE (vocab {vocab_size_of(tok)}) on {len(train_texts)} train docs "
        f"in {time.perf_counter() - start:.1f} s -> {path}")
    return tok


def _read_cached(path: Path, log: Callable[[str], None]) -> Optional[Tokenizer]:
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
        find_eos_id(tok, str(path))
        return tok
    except Exception as e:  # a damaged cache is rebuilt, never fatal
        log(f"data: ignoring damaged cached tokenizer {path}: {e}")
        return None
