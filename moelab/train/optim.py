"""AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (including stacked expert weights), none on norms, biases and the
    embedding table, as in GPT-2/3 practice. Fused/foreach implementations are left to torch."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step``: cosine decay from ``lr`` to ``lr * min_lr_ratio``
    over the budget's ``progress`` in [0, 1], times a linear warmup factor over the first
    ``warmup_steps`` steps. Driving the cosine by progress rather than step count lets step,
    token and wall-clock budgets share one schedule."""
    floor = cfg.lr * cfg.min_lr_ratio
    cosine = floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cosine * warmup
