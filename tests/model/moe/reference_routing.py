"""Per-token reference implementations of every routing rule, written independently of
moelab.model.moe.router: plain loops over tokens (and, for the rules that look at other tokens,
over experts), one token's scores at a time, in whatever dtype the layer has (float64 in tests).

``reference_moe(layer, x_ND, ...)`` returns the layer's output computed token by token:
route the token, then add each chosen expert's output (``naive_expert``) times its weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _renormalised(weights: list[torch.Tensor], cfg) -> list[torch.Tensor]:
    if cfg.renormalize and cfg.top_k > 1:
        total = sum(weights)
        weights = [w / (total + 1e-20) for w in weights]
    return [w * cfg.routed_scaling for w in weights] if cfg.routed_scaling != 1.0 else weights


def _top(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def token_choice(layer, x_D: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """softmax top-k of one token (with the learned group gate when configured)."""
    cfg, router = layer.cfg, layer.router
    logits = router.gate @ x_D                                                  # (E,)
    E = logits.shape[0]
    if cfg.group_router == "learned":
        G = cfg.n_groups
        group_p = torch.softmax(router.group_gate @ x_D, dim=0)               # (G,)
        per = E // G
        scores = torch.cat([group_p[g] * torch.softmax(logits[g * per:(g + 1) * per], dim=0)
                            for g in range(G)])
        groups = _top(group_p.tolist(), cfg.topk_groups)
        allowed = [e for e in range(E) if e // per in groups]
        chosen = [allowed[i] for i in _top([scores[e].item() for e in allowed], cfg.top_k)]
    else:
        scores = torch.softmax(logits, dim=0)
        chosen = _top(scores.tolist(), cfg.top_k)
    return list(zip(chosen, _renormalised([scores[e] for e in chosen], cfg)))


def sinkhorn_choices(layer, x_ND: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
    """Sinkhorn-balanced selection over all tokens (plain loops, no tensors ops across tokens),
    weights from each token's own softmax."""
    cfg, router = layer.cfg, layer.router
    N = x_ND.shape[0]
    probs = [torch.softmax(router.gate @ x_ND[n], dim=0) for n in range(N)]
    E = probs[0].shape[0]
    p = [[probs[n][e].item() for e in range(E)] for n in range(N)]
    for _ in range(cfg.sinkhorn_iters):
        col = [sum(p[n][e] for n in range(N)) for e in range(E)]
        p = [[p[n][e] / col[e] for e in range(E)] for n in range(N)]
        p = [[v / sum(row) for v in row] for row in p]
    out = []
    for n in range(N):
        chosen = _top(p[n], cfg.top_k)
        out.append(list(zip(chosen, _renormalised([probs[n][e] for e in chosen], cfg))))
    return out


def reinforce_choices(layer, x_ND: torch.Tensor, u_NE: torch.Tensor):
    """Sampling with the given uniforms (Gumbel top-k), weights detached; and each token's
    Plackett-Luce log-probability of its ordered draw."""
    cfg, router = layer.cfg, layer.router
    out, logprobs = [], []
    for n in range(x_ND.shape[0]):
        logp = torch.log_softmax(router.gate @ x_ND[n], dim=0)
        perturbed = [logp[e].item() - math.log(-math.log(u_NE[n, e].item())) for e in range(logp.shape[0])]
        chosen = _top(perturbed, cfg.top_k)
        weights = _renormalised([logp[e].exp().detach() for e in chosen], cfg)
        out.append(list(zip(chosen, weights)))
        lp, drawn = logp.new_zeros(()), 0.0
        for e in chosen:
            lp = lp + logp[e] - math.log(1.0 - drawn)
            drawn += logp[e].exp().item()
        logprobs.append(lp)
    return out, torch.stack(logprobs)


def relu_choices(layer, x_D: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    gates = layer.router.gate @ x_D
    return [(e, F.relu(gates[e])) for e in range(gates.shape[0]) if gates[e].item() > 0]


def expert_choice_choices(layer, x_ND: torch.Tensor, group_size: int):
    """Each expert takes the top C tokens of each group of ``group_size`` by that token's
    softmax score for it."""
    cfg, router = layer.cfg, layer.router
    N = x_ND.shape[0]
    probs = [torch.softmax(router.gate @ x_ND[n], dim=0) for n in range(N)]
    E = probs[0].shape[0]
    factor = cfg.capacity_factor or 1.0
    C = min(group_size, math.ceil(factor * group_size * cfg.top_k / E))
    out: list[list] = [[] for _ in range(N)]
    for start in range(0, N, group_size):
        members = list(range(start, start + group_size))
        for e in range(E):
            scores = [probs[n][e].item() for n in members]
            for i in _top(scores, C):
                n = members[i]
                out[n].append((e, probs[n][e]))
    return out


def reference_moe(layer, x_ND: torch.Tensor, *, token_ids: Optional[torch.Tensor] = None,
                  group_size: Optional[int] = None, u_NE: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output, token by token, from the reference routing."""
    cfg = layer.cfg
    N = x_ND.shape[0]
    kind = cfg.router
    if kind == "hash":
        table = layer.router.hash_table
        choices = [[(int(e), x_ND.new_tensor(1.0 / cfg.top_k)) for e in table[int(token_ids[n])]]
                   for n in range(N)]
    elif kind == "sinkhorn" and layer.training:
        choices = sinkhorn_choices(layer, x_ND)
    elif kind == "reinforce" and layer.training:
        choices, _ = reinforce_choices(layer, x_ND, u_NE)
    elif kind == "relu":
        choices = [relu_choices(layer, x_ND[n]) for n in range(N)]
    elif kind == "expert_choice":
        choices = expert_choice_choices(layer, x_ND, group_size or N)
    else:
        choices = [token_choice(layer, x_ND[n]) for n in range(N)]
    rows = []
    for n in range(N):
        y = x_ND.new_zeros(x_ND.shape[1])
        for e, w in choices[n]:
            y = y + w * layer.experts.naive_expert(e, x_ND[n])
        if layer.shared is not None:
            y = y + layer.shared_output(x_ND[n])
        rows.append(y)
    return torch.stack(rows)
