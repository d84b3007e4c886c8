"""Every layout moelab can run on a number of GPUs.

The rules are issue 13's: ``dp_shard`` divides the world size (the rest replicates, HSDP), ``ep``
divides ``dp_shard`` (EP ranks come out of the sharding group) and the expert count of every MoE
layer. A dense model has only ep = 1. Each (dp_shard, ep) pair is tried with activation
checkpointing off and on, and with micro-batches of 1, 2, 4, ... sequences per GPU up to the
GPU's share of the global batch.
"""

from __future__ import annotations

import math
from typing import Iterator

from moelab.config import ModelConfig
from moelab.plan.inputs import Layout


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def expert_counts(cfg: ModelConfig) -> list[int]:
    return sorted({cfg.experts_in_layer(i) for i in cfg.moe_layer_indices()})


def valid_ep(cfg: ModelConfig, dp_shard: int) -> list[int]:
    counts = expert_counts(cfg)
    return [e for e in divisors(dp_shard) if all(E % e == 0 for E in counts)] if counts else [1]


def micro_batches(sequences_per_gpu: float) -> list[int]:
    """1, 2, 4, ... up to the GPU's sequences per step (at least 1)."""
    top = max(1, math.ceil(sequences_per_gpu - 1e-9))
    out, m = [], 1
    while m <= top:
        out.append(m)
        m *= 2
    return out


def enumerate_layouts(cfg: ModelConfig, gpus: int, sequences_per_gpu: float) -> Iterator[Layout]:
    for s in divisors(gpus):
        for e in valid_ep(cfg, s):
            for ac in (False, True):
                for m in micro_batches(sequences_per_gpu):
                    yield Layout(dp_shard=s, dp_replicate=gpus // s, ep=e, activation_checkpointing=ac,
                                 micro_batch=m)
