"""Scoring a model on fixed batches: the validation loss the trainer logs and ``moelab eval``
reports, computed the same way by both so the two agree.

Legend: B batch, T tokens, V vocabulary, N scored targets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from moelab.model.linear_cross_entropy import IGNORE_INDEX
from moelab.model.transformer import Transformer


def autocast(device: torch.device):
    """bf16 autocast on CUDA (where the experts' grouped GEMMs want bf16); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from materialised logits (the unfused form, for models that
    only return logits; ``Transformer(x, targets=y).loss`` is the same number, fused)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: Transformer, batches, device: torch.device, runtime=None) -> float:
    """Mean cross-entropy over fixed validation windows (eval mode: dropless routing); under
    torch.distributed each rank scores its rows of every window and the mean is over all."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        if runtime is not None:
            x, y = runtime.local_rows(x), runtime.local_rows(y)
        with autocast(device):
            total += model(x.to(device), targets=y.to(device)).loss.item()
    model.train(was_training)
    mean = total / max(1, len(batches))
    return runtime.mean([mean])[0] if runtime is not None else mean


@dataclass(frozen=True)
class Scores:
    loss: float       # mean cross-entropy over the scored targets
    accuracy: float   # fraction of the scored targets that are the model's top-1 prediction
    scored: int       # how many targets were scored


@torch.no_grad()
def evaluate_scores(model: Transformer, batches, device: torch.device, runtime=None) -> Scores:
    """Loss and top-1 accuracy over the scored targets of fixed batches (for a masked LM: the
    masked-token loss and accuracy). Reads the logits, so it costs more than ``evaluate``. Under
    torch.distributed each rank scores its rows and the sums are taken over every rank."""
    was_training = model.training
    model.eval()
    loss_sum, correct, scored = 0.0, 0, 0
    for x, y in batches:
        if runtime is not None:
            x, y = runtime.local_rows(x), runtime.local_rows(y)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x).logits
        keep = y != IGNORE_INDEX                                          # (B, T)
        logits_NV, y_N = logits[keep].float(), y[keep]
        loss_sum += F.cross_entropy(logits_NV, y_N, reduction="sum").item()
        correct += int((logits_NV.argmax(dim=-1) == y_N).sum())
        scored += int(y_N.numel())
    model.train(was_training)
    if runtime is not None:
        loss_sum, correct, scored = runtime.sum_tensor(
            torch.tensor([loss_sum, correct, scored], dtype=torch.float64)).tolist()
        correct, scored = int(correct), int(scored)
    return Scores(loss_sum / max(1, scored), correct / max(1, scored), scored)


def validate(model: Transformer, batches, device: torch.device, runtime, objective: str
             ) -> tuple[float, Optional[float]]:
    """The validation loss the run logs, and for a masked LM the masked-token accuracy from the
    same pass: scored as ``moelab eval`` scores the run, so the two agree."""
    if objective == "mlm":
        scores = evaluate_scores(model, batches, device, runtime)
        return scores.loss, scores.accuracy
    return evaluate(model, batches, device, runtime), None
