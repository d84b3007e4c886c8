"""The byte-level BPE: exact round trips, user tokenizer files and their checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.config import DataConfig
from moelab.data import EOS_TOKEN, MASK_TOKEN, DataError, PreparedData, prepare_data
from moelab.data.tokenizer import load_tokenizer_file, train_bpe

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "\tif a:\n\t\tpass  # tabs\r\n",
    "  leading spaces and trailing   \n\n\n",
    "naïve café, 日本語, emoji 😀, math ∑∫\n",
    'print("hello, world")',
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_trained_tokenizer_round_trips(prepared: PreparedData, text: str) -> None:
    tok = prepared.tokenizer
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_trained_tokenizer_shape(prepared: PreparedData) -> None:
    tok = prepared.tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == 512
    assert prepared.eos_id == tok.token_to_id(EOS_TOKEN) == 0
    assert tok.token_to_id(MASK_TOKEN) == 1          # reserved in every trained BPE (masked LM)
    # Merges were learned: common code text takes far fewer tokens than bytes.
    text = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(text).ids) < len(text.encode()) / 2


def test_bpe_needs_room_for_bytes() -> None:
    with pytest.raises(DataError, match=r"model\.vocab_size = 200"):
        train_bpe(["abc"], 200)
    with pytest.raises(DataError, match=r"model\.vocab_size = 257 .*end-of-text \+ mask"):
        train_bpe(["abc"], 257)


def test_user_tokenizer_file_is_used(prepared: PreparedData, stdlib_slice: DataConfig,
                                     tmp_path: Path, log) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(prepared.tokenizer_json, encoding="utf-8")
    cfg = DataConfig(max_bytes=stdlib_slice.max_bytes, tokenizer=str(path))
    prep = prepare_data(cfg, 1024, cache_dir=tmp_path / "cache", log=log)
    assert prep.tokenizer_json == prepared.tokenizer_json
    assert log.has(f"tokenizer {path}") and not log.has("trained byte-level BPE")
    assert (prep.train_tokens == prepared.train_tokens).all()


def test_user_tokenizer_errors_name_the_option(prepared: PreparedData, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.tokenizer = .*missing\.json' does not exist"):
        load_tokenizer_file(tmp_path / "missing.json", 1024)
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.tokenizer = .*not a readable tokenizer"):
        load_tokenizer_file(bad, 1024)
    good = tmp_path / "tokenizer.json"
    good.write_text(prepared.tokenizer_json, encoding="utf-8")
    assert load_tokenizer_file(good, 512).get_vocab_size() == 512
    with pytest.raises(DataError, match=r"model\.vocab_size = 511 .*512 tokens"):
        load_tokenizer_file(good, 511)
