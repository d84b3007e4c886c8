"""Routers: which experts each token visits, and with what weight.

Legend: N tokens, D model width, E experts, K experts per token, G expert groups.

The routing math lives in small pure functions (scores, group limiting, top-k, capacity); the
``Router`` module only owns the gate weight, the optional noise weight and the balancing bias.
Router arithmetic runs in float32 whatever the autocast dtype: top-k choices are sensitive to
rounding, and DeepSeek and Switch both keep the router in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import MoEConfig
from moelab.model.moe.losses import expert_histogram


@dataclass
class Routing:
    ids_NK: torch.Tensor        # int64 expert of each assignment
    weights_NK: torch.Tensor    # float32 combine weight of each assignment
    probs_NE: torch.Tensor      # float32 normalised scores (sum to 1 per token), for losses/stats
    logits_NE: torch.Tensor     # float32 raw router logits, for z-loss


def group_limited_mask(select_NE: torch.Tensor, n_groups: int, topk_groups: int,
                       group_score: str) -> torch.Tensor:
    """Keep only experts inside each token's best ``topk_groups`` groups (DeepSeek-V2 device-
    limited routing; DeepSeek-V3 node-limited routing scores a group by its top-2 sum).
    Returns the selection scores with the other groups set to -inf."""
    N, E = select_NE.shape
    grouped_NGe = select_NE.view(N, n_groups, E // n_groups)
    if group_score == "max":
        group_NG = grouped_NGe.amax(dim=-1)
    else:
        group_NG = grouped_NGe.topk(2, dim=-1).values.sum(dim=-1)
    top_groups = group_NG.topk(topk_groups, dim=-1).indices                  # (N, topk_groups)
    keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(1, top_groups, True)
    keep_NE = keep_NG.unsqueeze(-1).expand_as(grouped_NGe).reshape(N, E)
    return select_NE.masked_fill(~keep_NE, float("-inf"))


def route(logits_NE: torch.Tensor, cfg: MoEConfig, bias_E: Optional[torch.Tensor]) -> Routing:
    """Scores -> (optional bias, group limit) -> top-k -> weights.

    softmax / noisy: GShard/Mixtral/Switch. Weights are the softmax probabilities of the chosen
    experts, renormalised over the K chosen when ``renormalize`` (Mixtral) or not (Switch top-1).
    sigmoid: DeepSeek-V3. Per-expert affinities; ``bias_E`` shifts the *selection* only, the weights
    use the unbiased scores, then are renormalised and scaled by ``routed_scaling``.
    """
    if logits_NE.dtype != torch.float64:
        logits_NE = logits_NE.float()
    if cfg.router == "sigmoid":
        scores_NE = torch.sigmoid(logits_NE)
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    else:
        scores_NE = probs_NE = torch.softmax(logits_NE, dim=-1)
    select_NE = scores_NE if bias_E is None else scores_NE + bias_E
    if cfg.n_groups > 1:
        select_NE = group_limited_mask(select_NE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
    ids_NK = select_NE.topk(cfg.top_k, dim=-1, sorted=True).indices          # (N, K)
    weights_NK = scores_NE.gather(1, ids_NK)                                  # (N, K)
    if cfg.renormalize and cfg.top_k > 1:
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling != 1.0:
        weights_NK = weights_NK * cfg.routed_scaling
    return Routing(ids_NK, weights_NK, probs_NE, logits_NE)


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * N * K / E) (GShard / Switch expert capacity)."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(routing: Routing, num_experts: int, slots: int, policy: str) -> torch.Tensor:
    """Which assignments fit in their expert's ``slots``; (N, K) bool.

    Slots are filled in priority order and the rest are dropped:
    - "position" (GShard): every token's 1st choice before any token's 2nd choice, and so on;
      within one choice rank, earlier tokens (lower flat index) first;
    - "score" (Batch Prioritized Routing, Riquelme et al. 2021): higher routing weight first,
      ties broken by the position order above.
    A dropped assignment contributes nothing; if all of a token's assignments drop, the token
    passes through on the residual alone.
    """
    ids_NK = routing.ids_NK
    N, K = ids_NK.shape
    # flat assignment indices (n * K + k) in position priority: choice rank k major, token n minor
    k_col = torch.arange(K, device=ids_NK.device).unsqueeze(1)                # (K, 1)
    n_row = torch.arange(N, device=ids_NK.device).unsqueeze(0)                # (1, N)
    order = (n_row * K + k_col).flatten()                                     # (K*N,)
    flat_ids = ids_NK.flatten()
    if policy == "score":
        w = routing.weights_NK.flatten()[order]
        order = order[torch.argsort(-w, stable=True)]
    by_expert = torch.argsort(flat_ids[order], stable=True)  # grouped by expert, priority kept
    ranked = order[by_expert]                                # flat assignment index, sorted
    sorted_ids = flat_ids[ranked]
    counts_E = expert_histogram(sorted_ids, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(N * K, device=ids_NK.device) - starts_E[sorted_ids]
    keep = torch.empty(N * K, dtype=torch.bool, device=ids_NK.device)
    keep[ranked] = rank_in_expert < slots
    return keep.view(N, K)


class Router(nn.Module):
    """Gate weight (E, D), optional learned noise (noisy top-k, Shazeer et al. 2017) and the
    aux-loss-free balancing bias (DeepSeek-V3) with the load it has seen since its last update."""

    def __init__(self, d_model: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.gate = nn.Parameter(torch.empty(num_experts, d_model))
        if cfg.router == "noisy":
            self.noise = nn.Parameter(torch.zeros(num_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load_seen", torch.zeros(num_experts), persistent=False)
        # False while activation checkpointing replays a forward: its tokens were counted once
        self.count_load = True

    def forward(self, x_ND: torch.Tensor) -> Routing:
        dtype = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
        logits_NE = F.linear(x_ND.to(dtype), self.gate.to(dtype))
        if self.cfg.router == "noisy" and self.training:
            noise_std_NE = F.softplus(F.linear(x_ND.to(dtype), self.noise.to(dtype)))
            logits_NE = logits_NE + torch.randn_like(logits_NE) * noise_std_NE
        # Decided from the config, not the buffer's values, so the hot path never syncs.
        use_bias = self.cfg.router == "sigmoid" or self.cfg.bias_update_rate > 0
        routing = route(logits_NE, self.cfg, self.expert_bias if use_bias else None)
        if self.training and self.cfg.bias_update_rate > 0 and self.count_load:
            with torch.no_grad():
                self.load_seen += expert_histogram(routing.ids_NK, self.num_experts)
        return routing

    @torch.no_grad()
    def update_bias(self, count_reducer=None) -> None:
        """b_i += rate * sign(mean load - load_i) over the load seen since the last call
        (DeepSeek-V3, section 2.1.2). Call once per optimiser step. ``count_reducer`` sums the
        load over data-parallel ranks, so that every rank applies the same update."""
        if self.cfg.bias_update_rate <= 0:
            return
        load = self.load_seen if count_reducer is None else count_reducer(self.load_seen)
        # no "any load seen?" test: it would be a host sync per layer and step on CUDA, and with
        # no load the error is 0 everywhere, so sign(0) = 0 leaves the biases as they are
        error = load.mean() - load
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(error)
        self.load_seen.zero_()
