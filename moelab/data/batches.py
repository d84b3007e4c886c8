"""Batches: windows of ``seq_len + 1`` tokens cut from a token stream.

Legend: B = batch size, T = sequence length.

Training batches are random windows, but batch ``i`` is a pure function of ``(seed, i)``: its
random generator is seeded with both, so there is no iterator state to checkpoint. Resuming at
step ``i`` only needs ``i``, and a resumed run sees exactly the batches the uninterrupted run saw.
Validation batches are fixed, evenly spaced windows, so every evaluation scores the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.data.errors import DataError


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{what} tokens must be a 1-D array, got shape {tokens.shape}")
    if seq_len < 1:
        raise DataError(f"train.seq_len = {seq_len} is invalid: must be >= 1")
    if len(tokens) < seq_len + 1:
        raise DataError(f"train.seq_len = {seq_len} is too long for the {what} split "
                        f"({len(tokens)} tokens): lower train.seq_len or use more data "
                        "(data.max_bytes, data.val_fraction)")


def _windows(tokens: np.ndarray, starts_B: np.ndarray,
             seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at ``starts_B``."""
    idx_BT = starts_B[:, None] + np.arange(seq_len + 1)              # (B, T+1)
    window_BT = torch.from_numpy(np.asarray(tokens[idx_BT], dtype=np.int64))
    x_BT = window_BT[:, :-1].contiguous()                             # (B, T)
    y_BT = window_BT[:, 1:].contiguous()                              # (B, T), x shifted by one
    return x_BT, y_BT


class TokenBatches:
    """Random training windows; ``batch(i)`` depends on ``(seed, i)`` only."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        _check_length(tokens, seq_len, "train")
        if batch_size < 1:
            raise DataError(f"train.batch_size = {batch_size} is invalid: must be >= 1")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_starts = len(tokens) - seq_len   # valid window starts: 0 .. len - T - 1

    def starts(self, index: int) -> np.ndarray:
        """Window start offsets of batch ``index``, shape (B,)."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        # SeedSequence takes non-negative entropy; fold negative seeds into the same range.
        rng = np.random.default_rng([self.seed % (1 << 64), index])
        return rng.integers(0, self.num_starts, size=self.batch_size, dtype=np.int64)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 tensors of shape (B, T); ``y[:, t]`` is the token after ``x[:, t]``,
        so ``y[:, :-1] == x[:, 1:]``."""
        return _windows(self.tokens, self.starts(index), self.seq_len)


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` fixed batches of evenly spaced windows covering the whole split (windows
    overlap when the split is shorter than ``num_batches * batch_size * seq_len`` tokens)."""
    _check_length(tokens, seq_len, "validation")
    if num_batches < 1 or batch_size < 1:
        raise DataError(f"train.eval_batches = {num_batches} and train.batch_size = {batch_size} "
                        "must both be >= 1")
    last_start = len(tokens) - seq_len - 1
    starts = np.linspace(0, last_start, num_batches * batch_size).round().astype(np.int64)
    return [_windows(tokens, starts_B, seq_len) for starts_B in starts.reshape(num_batches, batch_size)]
