"""prepare_data end to end: token streams, dtypes, and the caches (reuse and crash safety)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moelab.config import DataConfig
from moelab.data import PreparedData, default_cache_dir, load_corpus, prepare_data, split_documents
from moelab.data import tokens as tokens_module
from moelab.data.tokens import token_dtype


def test_streams_are_documents_joined_by_eos(prepared: PreparedData, stdlib_slice: DataConfig) -> None:
    docs, info = load_corpus(stdlib_slice)
    train, val = split_documents(docs, stdlib_slice.val_fraction)
    assert prepared.corpus == info
    tok, eos = prepared.tokenizer, prepared.eos_id
    for stream, split in ((prepared.train_tokens, train), (prepared.val_tokens, val)):
        assert isinstance(stream, np.memmap) and stream.ndim == 1
        ends = np.flatnonzero(np.asarray(stream) == eos)
        assert len(ends) == len(split) and ends[-1] == len(stream) - 1
        pieces = np.split(np.asarray(stream), ends[:-1] + 1)
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in split]


def test_uint16_when_the_vocab_fits(prepared: PreparedData) -> None:
    assert prepared.train_tokens.dtype == np.uint16 and prepared.val_tokens.dtype == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_second_call_reuses_the_caches(prepared: PreparedData, stdlib_slice: DataConfig,
                                       data_cache: Path, log) -> None:
    files = sorted(p for p in data_cache.rglob("*") if p.is_file())
    assert len(files) == 5   # tokenizer + (bin, json) per split
    before = {p: p.stat().st_mtime_ns for p in files}
    again = prepare_data(stdlib_slice, 512, cache_dir=data_cache, log=log)
    assert log.has("tokenizer from cache") and not log.has("trained byte-level BPE")
    assert log.has("train tokens from cache") and log.has("val tokens from cache")
    assert not log.has("tokenised")
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert again.tokenizer_json == prepared.tokenizer_json
    assert np.array_equal(again.train_tokens, prepared.train_tokens)


def test_different_vocab_or_split_gets_its_own_cache(tmp_path: Path, log) -> None:
    small = DataConfig(max_bytes=60_000)
    a = prepare_data(small, 300, cache_dir=tmp_path, log=log)
    b = prepare_data(small, 320, cache_dir=tmp_path, log=log)
    c = prepare_data(DataConfig(max_bytes=60_000, val_fraction=0.5), 300, cache_dir=tmp_path, log=log)
    assert sum("trained byte-level BPE" in line for line in log) == 3
    assert a.tokenizer.get_vocab_size() == 300 and b.tokenizer.get_vocab_size() == 320
    assert len(c.val_tokens) > len(a.val_tokens)


def test_a_half_written_cache_is_not_trusted(tmp_path: Path, log, monkeypatch) -> None:
    cfg = DataConfig(max_bytes=60_000)
    real = tokens_module._encode_many

    def crash(tok, texts):   # the run "dies" in the middle of writing the train stream
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens_module, "_encode_many", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, 300, cache_dir=tmp_path, log=log)
    assert not list((tmp_path / "tokens").glob("*")), "no partial or temp file may remain"

    monkeypatch.setattr(tokens_module, "_encode_many", real)
    # A copy: truncating the file in place below would pull the pages from under a live memmap.
    good = np.array(prepare_data(cfg, 300, cache_dir=tmp_path, log=log).train_tokens)
    bin_path = next((tmp_path / "tokens").glob("*-train.bin"))
    # A truncated .bin (sidecar intact) and a .bin without sidecar are both re-encoded.
    with open(bin_path, "r+b") as f:
        f.truncate(10)
    log.clear()
    again = prepare_data(cfg, 300, cache_dir=tmp_path, log=log)
    assert log.has("tokenised train") and log.has("val tokens from cache")
    assert np.array_equal(again.train_tokens, good)
    bin_path.with_suffix(".json").unlink()
    log.clear()
    prepare_data(cfg, 300, cache_dir=tmp_path, log=log)
    assert log.has("tokenised train")


def test_a_damaged_cached_tokenizer_is_retrained(tmp_path: Path, log) -> None:
    cfg = DataConfig(max_bytes=60_000)
    first = prepare_data(cfg, 300, cache_dir=tmp_path, log=log)
    cached = next((tmp_path / "tokenizers").glob("*.json"))
    cached.write_text("{broken", encoding="utf-8")
    log.clear()
    second = prepare_data(cfg, 300, cache_dir=tmp_path, log=log)
    assert log.has("ignoring damaged cached tokenizer") and log.has("trained byte-level BPE")
    assert second.tokenizer_json == first.tokenizer_json   # BPE training is deterministic
    assert json.loads(cached.read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def test_log_reports_source_size_sha_and_counts(prepared: PreparedData, stdlib_slice: DataConfig,
                                                data_cache: Path, log) -> None:
    prepare_data(stdlib_slice, 512, cache_dir=data_cache, log=log)
    info = prepared.corpus
    assert log.has(f"corpus {info.source}: {info.num_docs} docs")
    assert log.has(f"sha256 {info.sha256[:12]}") and log.has("0.20 MB")
    assert log.has(f"{len(prepared.train_tokens):,} train tokens")


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOELAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "moelab"
