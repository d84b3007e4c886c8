"""BERT's masked-LM batches (Devlin et al. 2019, "BERT", section 3.1, Task #1).

Legend: B batch size, T sequence length, M masked positions per sequence.

A sequence keeps its tokens, except that ``M = max(1, round(probability * T))`` positions are
selected (the fixed count per sequence of BERT's own data pipeline, ``create_pretraining_data.py``,
rather than an independent coin per token: every batch then scores exactly ``B * M`` positions, so
per-batch means weigh every masked token alike). Of the selected positions 80% show the mask
token, 10% a random token of the vocabulary and 10% their own token, each decided by its own draw;
the model must predict the original token at every selected position and is scored nowhere else
(targets hold ``IGNORE_INDEX`` there). End-of-text tokens are never selected while a window has
enough other tokens, as BERT never masks its [SEP] separators.

Batches stay a pure function of ``(seed, step)``, as :class:`TokenBatches`'s windows are: the
masking of training batch ``i`` draws from a generator seeded with ``(seed, i)`` and a tag of its
own, and the validation batches are masked once from fixed seeds, so every evaluation of every
run scores the same masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from moelab.data.batches import TokenBatches
from moelab.model.linear_cross_entropy import IGNORE_INDEX

MASK_FRACTION = 0.8      # of the selected tokens: shown as the mask token
RANDOM_FRACTION = 0.1    # shown as a random token; the remaining 0.1 keep their own token
# Seeds the masking draws apart from the window draws of the same (seed, step).
MASKING_TAG = 0x4D4C4D   # "MLM"
VALIDATION_SEED = 0x56414C  # "VAL": validation masking is the same for every run


@dataclass(frozen=True)
class Masking:
    """What the masking needs to know about the tokenizer, and how much to mask."""

    mask_id: int
    vocab_size: int            # random replacements are drawn from [0, vocab_size)
    probability: float = 0.15  # train.mlm_probability
    protected_id: Optional[int] = None   # never selected while avoidable: end-of-text

    def per_sequence(self, seq_len: int) -> int:
        """M: how many positions of a ``seq_len``-token sequence are selected."""
        return min(seq_len, max(1, int(round(self.probability * seq_len))))


def mask_tokens(tokens_BT: torch.Tensor, masking: Masking,
                seed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` for the masked LM, both (B, T) int64: inputs with the selected
    positions replaced (80% mask token, 10% random token, 10% unchanged), targets holding the
    original token at the selected positions and ``IGNORE_INDEX`` elsewhere.

    A pure function of its arguments: every draw comes from a generator seeded with ``seed``."""
    rng = np.random.default_rng(list(seed))
    original_BT = tokens_BT.numpy()
    B, T = original_BT.shape
    M = masking.per_sequence(T)
    # M positions per row without replacement: the M smallest of uniform keys; a protected
    # token's key is pushed past every other, so it is chosen only when a row runs out of others
    keys_BT = rng.random((B, T))
    if masking.protected_id is not None:
        keys_BT[original_BT == masking.protected_id] += 1.0
    # (sorted, so which draw goes to which position does not depend on numpy's partition order)
    picked_BM = np.sort(np.argpartition(keys_BT, M - 1, axis=1)[:, :M], axis=1)  # (B, M)
    action_BM = rng.random((B, M))
    random_BM = rng.integers(0, masking.vocab_size, size=(B, M))
    rows_BM = np.arange(B)[:, None]

    inputs_BT = original_BT.copy()
    shown_BM = original_BT[rows_BM, picked_BM]                                # 10%: unchanged
    shown_BM = np.where(action_BM < MASK_FRACTION + RANDOM_FRACTION, random_BM, shown_BM)
    shown_BM = np.where(action_BM < MASK_FRACTION, masking.mask_id, shown_BM)
    inputs_BT[rows_BM, picked_BM] = shown_BM
    targets_BT = np.full_like(original_BT, IGNORE_INDEX)
    targets_BT[rows_BM, picked_BM] = original_BT[rows_BM, picked_BM]
    return torch.from_numpy(inputs_BT), torch.from_numpy(targets_BT)


class MaskedBatches:
    """Training batches for the masked LM, with :class:`TokenBatches`'s interface: ``batch(i)``
    is ``(inputs, targets)``, a function of ``(seed, i)`` only. The windows are TokenBatches'
    (its first T tokens; the next-token shift is unused)."""

    def __init__(self, windows: TokenBatches, masking: Masking) -> None:
        self.windows = windows
        self.masking = masking
        self.batch_size, self.seq_len, self.seed = windows.batch_size, windows.seq_len, windows.seed

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_BT, _ = self.windows.batch(index)
        return mask_tokens(tokens_BT, self.masking, (self.seed % (1 << 64), index, MASKING_TAG))


def masked_val_batches(windows: list[tuple[torch.Tensor, torch.Tensor]],
                       masking: Masking) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation windows of :func:`val_batches`, each masked from a fixed seed."""
    return [mask_tokens(x_BT, masking, (VALIDATION_SEED, j)) for j, (x_BT, _) in enumerate(windows)]
