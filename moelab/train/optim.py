"""AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (including stacked expert weights), none on norms, biases and the
    embedding table, as in GPT-2/3 practice.

    The fused AdamW kernel is asked for explicitly: on CPU torch otherwise picks the per-parameter
    for-loop, about eight elementwise passes over every parameter per step, which took ~12% of a
    ``mixtral`` training step on 2 CPU cores (benchmarks/RESULTS.md, training throughput); the
    fused kernel makes one pass. Hugging Face's Trainer defaults to it too (``adamw_torch_fused``).
    Where torch refuses it (a device or dtype without the kernel) we fall back to torch's choice.
    A resumed run takes the implementation recorded in its checkpoint's param groups, so runs
    saved before this change continue bit for bit with the for-loop they started with."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    options = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, **options)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step``: cosine decay from ``lr`` to ``lr * min_lr_ratio``
    over the budget's ``progress`` in [0, 1], times a linear warmup factor over the first
    ``warmup_steps`` steps. Driving the cosine by progress rather than step count lets step,
    token and wall-clock budgets share one schedule."""
    floor = cfg.lr * cfg.min_lr_ratio
    cosine = floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cosine * warmup
