"""Training and validation batches: deterministic windows, targets shifted by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import DataError, TokenBatches, val_batches

TOKENS = np.arange(1000, dtype=np.uint16)   # token i has id i: a window's offset is visible


def test_batch_is_a_pure_function_of_seed_and_index() -> None:
    a = TokenBatches(TOKENS, batch_size=4, seq_len=16, seed=7)
    b = TokenBatches(TOKENS.copy(), batch_size=4, seq_len=16, seed=7)
    for i in (5, 0, 3, 5):           # any order, repeated: resuming needs only the index
        xa, ya = a.batch(i)
        xb, yb = b.batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], TokenBatches(TOKENS, 4, 16, seed=8).batch(0)[0])


def test_targets_are_inputs_shifted_by_one() -> None:
    x, y = TokenBatches(TOKENS, batch_size=8, seq_len=32, seed=0).batch(3)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)                           # consecutive ids: y is x shifted
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(y.max()) <= len(TOKENS) - 1 and int(x.min()) >= 0


def test_windows_cover_the_whole_stream() -> None:
    batches = TokenBatches(TOKENS[:20], batch_size=64, seq_len=4, seed=1)
    starts = np.concatenate([batches.starts(i) for i in range(20)])
    assert starts.min() == 0 and starts.max() == 20 - 4 - 1   # first and last window both occur


def test_val_batches_are_fixed_and_evenly_spaced() -> None:
    batches = val_batches(TOKENS, batch_size=2, seq_len=10, num_batches=3)
    again = val_batches(TOKENS, batch_size=2, seq_len=10, num_batches=3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == (2, 10) and torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(y, x + 1)
    starts = [int(x[r, 0]) for x, _ in batches for r in range(2)]
    assert starts[0] == 0 and starts[-1] == len(TOKENS) - 11
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1


def test_too_short_streams_name_seq_len() -> None:
    with pytest.raises(DataError, match=r"train\.seq_len = 16 .*train split \(16 tokens\)"):
        TokenBatches(TOKENS[:16], batch_size=2, seq_len=16, seed=0)
    TokenBatches(TOKENS[:17], batch_size=2, seq_len=16, seed=0).batch(0)   # exactly enough
    with pytest.raises(DataError, match=r"train\.seq_len = 64 .*validation"):
        val_batches(TOKENS[:10], batch_size=1, seq_len=64, num_batches=1)


def test_works_on_a_memmap(tmp_path) -> None:
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = TokenBatches(mm, 2, 8, seed=3).batch(0)
    x2, _ = TokenBatches(TOKENS, 2, 8, seed=3).batch(0)
    assert torch.equal(x, x2)
