"""BERT's masking: the 80/10/10 rule, loss positions, purity in (seed, step), the mask token."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tokenizers import trainers

from moelab.config import DataConfig, TrainConfig
from moelab.data import (
    MASK_TOKEN, DataError, Masking, MaskedBatches, PreparedData, TokenBatches, mask_tokens,
    objective_batches, prepare_data,
)
from moelab.data.objective import eval_batches
from moelab.data.tokenizer import EOS_TOKEN, new_bpe
from moelab.model.linear_cross_entropy import IGNORE_INDEX

MLM = TrainConfig(objective="mlm", batch_size=4, seq_len=32, eval_batches=3, seed=7)


def _rule_counts(original: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                 mask_id: int) -> dict[str, int]:
    sel = targets != IGNORE_INDEX
    shown, orig = inputs[sel], original[sel]
    is_mask = shown == mask_id
    is_kept = ~is_mask & (shown == orig)
    return {"selected": int(sel.sum()), "mask": int(is_mask.sum()), "kept": int(is_kept.sum()),
            "random": int((~is_mask & ~is_kept).sum())}


def test_masking_follows_the_80_10_10_rule_on_a_seeded_batch(prepared: PreparedData) -> None:
    """On 64 x 512 real tokens (4,928 selected) the shares must be 0.8 / 0.1 / 0.1 within 0.02:
    about 8, 4.5 and 4.5 binomial standard deviations, and far from any other rule (no random
    tokens, 90% masked, all masked, ...) so a wrong rule cannot pass by chance."""
    windows = TokenBatches(prepared.train_tokens, 64, 512, seed=3)
    x, _ = windows.batch(0)
    vocab = prepared.tokenizer.get_vocab_size(with_added_tokens=True)
    masking = Masking(mask_id=1, vocab_size=vocab, probability=0.15, protected_id=prepared.eos_id)
    inputs, targets = mask_tokens(x, masking, (3, 0, 1))
    M = masking.per_sequence(512)
    assert M == 77                                                   # round(0.15 * 512)
    assert ((targets != IGNORE_INDEX).sum(dim=1) == M).all()        # exactly M per sequence
    sel = targets != IGNORE_INDEX
    assert torch.equal(targets[sel], x[sel])                         # the original token is the target
    assert torch.equal(inputs[~sel], x[~sel])                        # nothing else changes
    counts = _rule_counts(x, inputs, targets, mask_id=1)
    n = counts["selected"]
    # a random draw lands on the original token with probability 1/vocab: "kept" gets ~0.1/512 extra
    assert abs(counts["mask"] / n - 0.8) < 0.02
    assert abs(counts["random"] / n - 0.1) < 0.02
    assert abs(counts["kept"] / n - 0.1) < 0.02
    # random replacements are spread over the vocabulary, not a few ids
    randoms = inputs[sel][(inputs[sel] != 1) & (inputs[sel] != x[sel])]
    assert randoms.min() >= 0 and randoms.max() < vocab and len(randoms.unique()) > 0.6 * len(randoms)


def test_selection_is_uniform_over_positions_and_skips_end_of_text() -> None:
    T, eos = 40, 0
    tokens = torch.arange(1, 2001).remainder(97).add(2).reshape(50, T)   # ids 2..98, no eos
    tokens[:, 7] = eos                                              # an end-of-text in every row
    masking = Masking(mask_id=1, vocab_size=100, probability=0.15, protected_id=eos)
    hits = torch.zeros(T)
    for i in range(40):
        _, targets = mask_tokens(tokens, masking, (0, i))
        hits += (targets != IGNORE_INDEX).sum(dim=0)
    assert hits[7] == 0                                             # never the separator
    others = torch.cat([hits[:7], hits[8:]])
    expected = 40 * 50 * 6 / (T - 1)                                # 6 of the 39 other positions
    assert (others - expected).abs().max() < 0.25 * expected       # ~6 sd of a position's count


def test_training_batches_are_a_pure_function_of_seed_and_step(prepared: PreparedData) -> None:
    train, val = objective_batches(MLM, prepared)
    assert isinstance(train, MaskedBatches)
    again, val_again = objective_batches(MLM, prepared)
    for step in (0, 5, 1000):
        a, b = train.batch(step), again.batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # each step and each seed draws its own masked positions
    picked = [train.batch(i)[1] != IGNORE_INDEX for i in range(3)]
    assert not torch.equal(picked[0], picked[1]) and not torch.equal(picked[1], picked[2])
    other_seed, val_other = objective_batches(dataclasses.replace(MLM, seed=8), prepared)
    assert not torch.equal(picked[0], other_seed.batch(0)[1] != IGNORE_INDEX)
    # the windows are the next-token objective's windows (same tokens, seed and step)
    clm, _ = objective_batches(dataclasses.replace(MLM, objective="clm"), prepared)
    x_mlm, y_mlm = train.batch(5)
    x_clm, _ = clm.batch(5)
    sel = y_mlm != IGNORE_INDEX
    assert torch.equal(y_mlm[sel], x_clm[sel]) and torch.equal(x_mlm[~sel], x_clm[~sel])
    # validation masking is fixed: the same for every run seed and every call
    assert len(val) == 3
    for (xa, ya), (xb, yb), (xc, yc) in zip(val, val_again, val_other):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc) and torch.equal(ya, yc)
    assert all(((y != IGNORE_INDEX).sum(dim=1) == 5).all() for _, y in val)    # round(0.15 * 32)


def test_trained_bpe_holds_the_mask_token(prepared: PreparedData) -> None:
    tok = prepared.tokenizer
    assert tok.token_to_id(EOS_TOKEN) == 0 and tok.token_to_id(MASK_TOKEN) == 1
    assert tok.encode(MASK_TOKEN, add_special_tokens=False).ids == [1]
    # ordinary text never encodes to it
    assert 1 not in tok.encode("x[MASK] <mask> mask\n", add_special_tokens=False).ids


def test_a_tokenizer_without_mask_token_is_a_named_error_for_mlm_only(
        prepared: PreparedData, stdlib_slice: DataConfig, tmp_path: Path) -> None:
    tok = new_bpe()
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 50, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False))
    path = tmp_path / "no-mask.json"
    path.write_text(tok.to_str(), encoding="utf-8")
    cfg = DataConfig(max_bytes=stdlib_slice.max_bytes, tokenizer=str(path))
    data = prepare_data(cfg, 512, cache_dir=tmp_path / "cache", log=lambda m: None)
    objective_batches(dataclasses.replace(MLM, objective="clm"), data)     # a decoder is fine
    with pytest.raises(DataError, match=r"train\.objective = 'mlm' needs a mask token.*data\.tokenizer"):
        objective_batches(MLM, data)
    with pytest.raises(DataError, match="mask token"):
        eval_batches(MLM, data)


def test_a_user_tokenizer_with_a_bert_mask_spelling_is_used(prepared: PreparedData,
                                                            tmp_path: Path) -> None:
    tok = new_bpe()
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 50, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[SEP]", "[PAD]", "[MASK]"], show_progress=False))
    data = dataclasses.replace(prepared, tokenizer=tok, eos_id=0)
    train, _ = objective_batches(MLM, data)
    assert train.masking.mask_id == 2
    assert train.masking.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert (train.batch(0)[0] == 2).any()
