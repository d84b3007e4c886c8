"""The balanced hash table of hash routing (Roller et al. 2021, "Hash Layers For Large Sparse
Models"): token ids assigned to experts so that every expert gets the same share of the training
tokens.

Legend: V vocabulary, E experts, K experts per token.

Roller et al.'s "balanced" hash assigns ids by frequency so that loads are equal; here that is the
greedy longest-processing-time rule: ids in falling frequency, each to the K least-loaded
experts so far (K distinct experts per id). Its worst expert exceeds the mean by at most the
frequency of one id, and on the built-in corpus no id carries 4% of the tokens. Ids that never
occur get experts round-robin, so that unseen text does not all land on one expert.

The table is fitted once from the training token stream when a run starts
(:func:`fit_hash_routers`), and lives in the router as a persistent buffer: it is saved in the run
folder's safetensors with the weights and comes back on resume, evaluation and export. (Its ids are
kept as float32, which holds them exactly; see ``Router``.)
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from torch import nn


def balanced_hash_table(counts_V: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """(V, K) int64 from each id's token count (V,)."""
    counts = counts_V.tolist()
    V, E, K = len(counts), num_experts, top_k
    table = [[0] * K for _ in range(V)]
    heap = [(0, e) for e in range(E)]                 # (load, expert): least loaded first
    seen = sorted((v for v in range(V) if counts[v] > 0), key=lambda v: (-counts[v], v))
    for v in seen:
        picked = [heapq.heappop(heap) for _ in range(K)]
        for k, (load, e) in enumerate(picked):
            table[v][k] = e
        for load, e in picked:
            heapq.heappush(heap, (load + counts[v], e))
    for v in range(V):
        if counts[v] == 0:
            table[v] = [(v + k) % E for k in range(K)]
    return torch.tensor(table, dtype=torch.long)


def token_counts(tokens, vocab_size: int) -> torch.Tensor:
    """Occurrences of each id in a token stream (a numpy array, memmap or tensor): (V,) int64."""
    if isinstance(tokens, torch.Tensor):
        flat = tokens.reshape(-1).long()
    else:
        flat = torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=False).reshape(-1))
    return torch.bincount(flat, minlength=vocab_size)[:vocab_size]


def hash_loads(table_VK: torch.Tensor, tokens, num_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,), when ``tokens`` are routed by ``table_VK``."""
    counts_V = token_counts(tokens, table_VK.shape[0])
    loads = torch.zeros(num_experts, dtype=torch.long)
    for k in range(table_VK.shape[1]):
        loads.scatter_add_(0, table_VK[:, k].long().cpu(), counts_V)
    return loads


@torch.no_grad()
def fit_hash_routers(model: nn.Module, tokens) -> int:
    """Give every "balanced" hash router in ``model`` the table fitted to ``tokens`` (the training
    stream); returns how many routers were fitted. Deterministic, so every rank of a distributed
    run fits the same table."""
    from moelab.model.moe.router import Router
    routers = [m for m in model.modules() if isinstance(m, Router)
               and m.cfg.router == "hash" and m.cfg.hash == "balanced"]
    if not routers:
        return 0
    counts_V = token_counts(tokens, routers[0].hash_table.shape[0])
    tables: dict[tuple[int, int], torch.Tensor] = {}
    for router in routers:
        key = (router.num_experts, router.cfg.top_k)
        if key not in tables:
            tables[key] = balanced_hash_table(counts_V, *key)
        router.hash_table.copy_(tables[key])         # stored as float32 (see Router)
    return len(routers)
