"""The batches of a training objective: what ``train.objective`` changes about the data.

    train, val = objective_batches(cfg.train, prepared)    # both yield (inputs, targets)

"clm" (a decoder): windows and their next tokens (:mod:`moelab.data.batches`). "mlm" (an encoder):
the same windows with BERT's masking (:mod:`moelab.data.mlm`), targets only at the masked
positions. Either way training batch ``i`` is a function of ``(train.seed, i)`` and the validation
batches are fixed, so the training loop and the evaluation do not branch on the objective.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from moelab.config import TrainConfig
from moelab.data.batches import TokenBatches, val_batches
from moelab.data.errors import DataError
from moelab.data.mlm import Masking, MaskedBatches, masked_val_batches
from moelab.data.prepare import PreparedData
from moelab.data.tokenizer import MASK_CANDIDATES, find_mask_id, vocab_size_of

Batch = tuple[torch.Tensor, torch.Tensor]


def masking_for(data: PreparedData, probability: float) -> Masking:
    """The masked LM's settings for this tokenizer; a DataError when it has no mask token."""
    mask_id = find_mask_id(data.tokenizer)
    if mask_id is None:
        raise DataError("train.objective = 'mlm' needs a mask token, and the tokenizer "
                        f"(data.tokenizer) has none (looked for {', '.join(MASK_CANDIDATES)}): "
                        "use a tokenizer with one, or leave data.tokenizer unset to train a BPE, "
                        "which always has one")
    return Masking(mask_id=mask_id, vocab_size=vocab_size_of(data.tokenizer),
                   probability=probability, protected_id=data.eos_id)


def train_batches(t: TrainConfig, data: PreparedData) -> Union[TokenBatches, MaskedBatches]:
    """Training batches for ``t.objective``; ``.batch(i)`` gives ``(inputs, targets)``."""
    windows = TokenBatches(data.train_tokens, t.batch_size, t.seq_len, t.seed)
    if t.objective == "mlm":
        return MaskedBatches(windows, masking_for(data, t.mlm_probability))
    return windows


def eval_batches(t: TrainConfig, data: PreparedData, num_batches: Optional[int] = None,
                 seq_len: Optional[int] = None) -> list[Batch]:
    """Fixed validation batches for ``t.objective`` (``t.eval_batches`` of ``t.seq_len`` tokens
    unless given)."""
    windows = val_batches(data.val_tokens, t.batch_size, seq_len or t.seq_len,
                          num_batches or t.eval_batches)
    if t.objective == "mlm":
        return masked_val_batches(windows, masking_for(data, t.mlm_probability))
    return windows


def objective_batches(t: TrainConfig, data: PreparedData) -> tuple[Union[TokenBatches, MaskedBatches], list[Batch]]:
    """``(training batches, validation batches)`` for ``t.objective``."""
    return train_batches(t, data), eval_batches(t, data)
