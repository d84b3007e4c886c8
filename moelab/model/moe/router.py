"""Routers: which experts each token visits, and with what weight.

Legend: N tokens, D model width, E experts, K experts per token, G expert groups, T tokens of one
routing group (a sequence), C tokens an expert takes, V vocabulary.

The routing math lives in small pure functions, one per routing rule, each returning a
:class:`Routing`; the ``Router`` module only owns parameters and buffers (gate weights, noise
weight, balancing bias, hash table, the ReLU router's L1 coefficient, the REINFORCE baseline) and
picks the rule from ``model.moe.router``. Every rule feeds the same dispatch and experts.
Router arithmetic runs in float32 whatever the autocast dtype: top-k choices are sensitive to
rounding, and DeepSeek and Switch both keep the router in full precision.

Two shapes of routing come out:
- token choice (softmax, noisy, sigmoid, hash, sinkhorn, reinforce): exactly K experts per
  token, ``ids_NK`` (N, K);
- variable (expert_choice, relu): a token may get zero or several experts. ``ids_NK`` is then
  (N, E), every expert in order, and ``keep_NK`` says which assignments exist; the dispatch
  drops the others exactly as it drops assignments over capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import MoEConfig
from moelab.model.moe.losses import expert_histogram

Reducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Routing:
    ids_NK: torch.Tensor        # int64 expert of each assignment
    weights_NK: torch.Tensor    # float32 combine weight of each assignment
    probs_NE: torch.Tensor      # float32 normalised scores (sum to 1 per token), for losses/stats
    logits_NE: torch.Tensor     # float32 raw router logits, for z-loss
    keep_NK: Optional[torch.Tensor] = None     # bool: which assignments exist (variable routers)
    logprob_N: Optional[torch.Tensor] = None   # reinforce: log-probability of the sampled experts


# ---------------------------------------------------------------------------------------------
# Token choice: scores -> (bias, group limit) -> top-k -> weights
# ---------------------------------------------------------------------------------------------

def mask_to_groups(select_NE: torch.Tensor, group_NG: torch.Tensor, topk_groups: int) -> torch.Tensor:
    """``select_NE`` with every expert outside each token's best ``topk_groups`` groups (by
    ``group_NG``) set to -inf."""
    N, E = select_NE.shape
    G = group_NG.shape[1]
    top_groups = group_NG.topk(topk_groups, dim=-1).indices                  # (N, topk_groups)
    keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(1, top_groups, True)
    keep_NE = keep_NG.unsqueeze(-1).expand(N, G, E // G).reshape(N, E)
    return select_NE.masked_fill(~keep_NE, float("-inf"))


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
    return mask_to_groups(select_NE, group_NG, topk_groups)


def learned_group_probs(logits_NE: torch.Tensor, group_logits_NG: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical gating (Shazeer et al. 2017, section B): p(g) from the group gate, p(e | g) a
    softmax over the experts of group g; returns (p(g) p(e | g), (N, E), which sums to 1 per
    token, and p(g), (N, G))."""
    N, E = logits_NE.shape
    G = group_logits_NG.shape[1]
    group_NG = torch.softmax(group_logits_NG, dim=-1)
    within_NGe = torch.softmax(logits_NE.view(N, G, E // G), dim=-1)
    return (group_NG.unsqueeze(-1) * within_NGe).reshape(N, E), group_NG


def chosen_weights(scores_NE: torch.Tensor, ids_NK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Scores of the chosen experts, renormalised over the K chosen when ``renormalize`` (Mixtral)
    and top_k > 1, times ``routed_scaling`` (DeepSeek)."""
    weights_NK = scores_NE.gather(1, ids_NK)                                  # (N, K)
    if cfg.renormalize and cfg.top_k > 1:
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling != 1.0:
        weights_NK = weights_NK * cfg.routed_scaling
    return weights_NK


def route(logits_NE: torch.Tensor, cfg: MoEConfig, bias_E: Optional[torch.Tensor],
          group_logits_NG: Optional[torch.Tensor] = None,
          select_NE: Optional[torch.Tensor] = None) -> Routing:
    """Scores -> (optional bias, group limit) -> top-k -> weights.

    softmax / noisy: GShard/Mixtral/Switch. Weights are the softmax probabilities of the chosen
    experts, renormalised over the K chosen when ``renormalize`` (Mixtral) or not (Switch top-1).
    sigmoid: DeepSeek-V3. Per-expert affinities; ``bias_E`` shifts the *selection* only, the weights
    use the unbiased scores, then are renormalised and scaled by ``routed_scaling``.
    ``group_logits_NG``: the learned group gate (``group_router = "learned"``); the scores are then
    p(g) p(e | g) and the groups are chosen by p(g).
    ``select_NE``: other selection scores (Sinkhorn's balanced assignment); weights stay the scores.
    """
    if logits_NE.dtype != torch.float64:
        logits_NE = logits_NE.float()
    group_NG = None
    if group_logits_NG is not None:
        scores_NE, group_NG = learned_group_probs(logits_NE, group_logits_NG.to(logits_NE.dtype))
        probs_NE = scores_NE
    elif cfg.router == "sigmoid":
        scores_NE = torch.sigmoid(logits_NE)
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    else:
        scores_NE = probs_NE = torch.softmax(logits_NE, dim=-1)
    if select_NE is None:
        select_NE = scores_NE if bias_E is None else scores_NE + bias_E
    if group_NG is not None:
        select_NE = mask_to_groups(select_NE, group_NG, cfg.topk_groups)
    elif cfg.n_groups > 1:
        select_NE = group_limited_mask(select_NE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
    ids_NK = select_NE.topk(cfg.top_k, dim=-1, sorted=True).indices          # (N, K)
    return Routing(ids_NK, chosen_weights(scores_NE, ids_NK, cfg), probs_NE, logits_NE)


# ---------------------------------------------------------------------------------------------
# The other routing rules
# ---------------------------------------------------------------------------------------------

def hash_route(table_VK: torch.Tensor, token_ids_N: torch.Tensor, num_experts: int) -> Routing:
    """Hash layers (Roller et al. 2021): token id -> K experts from a fixed table; each output
    weighs 1/K. Nothing here is learned, so nothing carries gradient to a router."""
    ids_NK = table_VK[token_ids_N].long()                                     # (N, K)
    N, K = ids_NK.shape
    weights_NK = torch.full((N, K), 1.0 / K, dtype=torch.float32, device=ids_NK.device)
    probs_NE = torch.zeros(N, num_experts, device=ids_NK.device).scatter_(1, ids_NK, 1.0 / K)
    return Routing(ids_NK, weights_NK, probs_NE, torch.zeros_like(probs_NE))


def sinkhorn_balance(logits_NE: torch.Tensor, iters: int,
                     col_reducer: Optional[Reducer] = None) -> torch.Tensor:
    """A balanced soft assignment (N, E) by Sinkhorn-Knopp iterations on softmax(logits):
    alternately scale each expert's column to an equal total and each token's row to 1 (the
    balanced assignment of BASE layers, Lewis et al. 2021, as approximated by S-BASE, Clark et al.
    2022). ``col_reducer`` sums the column totals over data-parallel ranks, so the balance is over
    the global batch and N processes pick what one process would. No gradient: it only selects."""
    with torch.no_grad():
        p_NE = torch.softmax(logits_NE, dim=-1)
        for _ in range(iters):
            col_E = p_NE.sum(dim=0)
            if col_reducer is not None:
                col_E = col_reducer(col_E)
            p_NE = p_NE / col_E.clamp_min(torch.finfo(p_NE.dtype).tiny)
            p_NE = p_NE / p_NE.sum(dim=-1, keepdim=True)
    return p_NE


def sampled_route(logits_NE: torch.Tensor, cfg: MoEConfig) -> Routing:
    """REINFORCE routing (RL-R, Clark et al. 2022): the K experts are sampled without replacement
    from softmax(logits) (Gumbel top-k, which draws them in sequence), and ``logprob_N`` is the
    sample's log-probability under that sequential (Plackett-Luce) draw, which carries the
    policy gradient. The combine weights are the chosen probabilities *detached*: the router
    learns only from the reward (and the balancing loss)."""
    logits_NE = logits_NE.float() if logits_NE.dtype != torch.float64 else logits_NE
    logp_NE = torch.log_softmax(logits_NE, dim=-1)
    probs_NE = logp_NE.exp()
    u_NE = torch.rand_like(logp_NE).clamp_(torch.finfo(logp_NE.dtype).tiny, 1.0)
    gumbel_NE = -torch.log(-torch.log(u_NE))
    ids_NK = (logp_NE.detach() + gumbel_NE).topk(cfg.top_k, dim=-1, sorted=True).indices
    return Routing(ids_NK, chosen_weights(probs_NE.detach(), ids_NK, cfg), probs_NE, logits_NE,
                   logprob_N=plackett_luce_logprob(logp_NE, ids_NK))


def plackett_luce_logprob(logp_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """log P(e_1, ..., e_K drawn in this order without replacement) = sum_k log p(e_k) -
    log(1 - sum_{j<k} p(e_j)); (N,)."""
    logp_NK = logp_NE.gather(1, ids_NK)
    p_NK = logp_NK.exp()
    before_NK = torch.cumsum(p_NK, dim=-1) - p_NK                  # mass already drawn
    rest_NK = (1.0 - before_NK).clamp_min(torch.finfo(p_NK.dtype).tiny)
    return (logp_NK - rest_NK.log()).sum(dim=-1)


def relu_route(logits_NE: torch.Tensor) -> Routing:
    """ReLU routing (ReMoE, Wang et al. 2025): every expert's gate is relu(logit), so each token
    uses the experts with a positive gate, and the gates are differentiable everywhere except at
    0. The number of active experts is steered by an L1 loss (:func:`losses.relu_l1_loss`)."""
    logits_NE = logits_NE.float() if logits_NE.dtype != torch.float64 else logits_NE
    N, E = logits_NE.shape
    gates_NE = torch.relu(logits_NE)
    ids_NE = torch.arange(E, device=logits_NE.device).expand(N, E)
    probs_NE = gates_NE.detach() / gates_NE.detach().sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return Routing(ids_NE, gates_NE, probs_NE, logits_NE, keep_NK=gates_NE.detach() > 0)


def expert_choice_capacity(group_size: int, num_experts: int, top_k: int, factor: float) -> int:
    """Tokens each expert takes from one group of ``group_size`` tokens: ceil(factor * T * K / E),
    at most T."""
    return min(group_size, capacity(group_size, num_experts, top_k, factor))


def expert_choice_route(logits_NE: torch.Tensor, top_k: int, factor: float, group_size: int) -> Routing:
    """Expert choice (Zhou et al. 2022): within each group of ``group_size`` consecutive tokens (a
    sequence), each expert takes the C tokens with the highest softmax score for it, C =
    ceil(factor * T * K / E); a token may be taken by no expert or by several. The weight of an
    assignment is the token's score for that expert. Loads are equal by construction."""
    logits_NE = logits_NE.float() if logits_NE.dtype != torch.float64 else logits_NE
    N, E = logits_NE.shape
    probs_NE = torch.softmax(logits_NE, dim=-1)
    T = group_size
    C = expert_choice_capacity(T, E, top_k, factor)
    probs_GET = probs_NE.view(N // T, T, E).transpose(1, 2)                   # (G, E, T)
    chosen_GEC = probs_GET.topk(C, dim=-1).indices
    keep_GET = torch.zeros_like(probs_GET, dtype=torch.bool).scatter_(2, chosen_GEC, True)
    keep_NE = keep_GET.transpose(1, 2).reshape(N, E)
    ids_NE = torch.arange(E, device=logits_NE.device).expand(N, E)
    return Routing(ids_NE, probs_NE, probs_NE, logits_NE, keep_NK=keep_NE)


# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Gate weight (E, D) and whatever state the configured rule needs:
    - noisy: the learned noise weight (Shazeer et al. 2017);
    - any token-choice rule: the aux-loss-free balancing bias (DeepSeek-V3) and the load seen since
      its last update;
    - group_router "learned": the group gate (G, D);
    - hash: no gate; the (V, K) table of experts per token id, a persistent buffer, so it is saved
      with the weights and reused on resume, evaluation and export;
    - relu: the L1 coefficient (persistent: a resumed run continues from it) and the active
      experts seen since its last update;
    - reinforce: the running baseline of the per-token loss, and the losses seen since its update.

    ``token_ids``: the token ids of the sequence being run, (N,) flattened; the hash rule reads
    them. The transformer sets them from its embedding's input on every forward, so each way of
    running the model (training, evaluation, generation) routes by the tokens it embeds.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: MoEConfig, vocab_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        kind = cfg.router
        if kind != "hash":
            self.gate = nn.Parameter(torch.empty(num_experts, d_model))
        if kind == "noisy":
            self.noise = nn.Parameter(torch.zeros(num_experts, d_model))
        if cfg.group_router == "learned":
            self.group_gate = nn.Parameter(torch.empty(cfg.n_groups, d_model))
        if kind == "hash":
            if vocab_size is None:
                raise ValueError("router 'hash' maps token ids to experts: the MoE layer needs "
                                 "vocab_size (MoE(..., vocab_size=V))")
            # expert ids stored as float32 (exact below 2^24): torch's distributed checkpoint
            # cannot consolidate integer tensors into safetensors (torch 2.13)
            self.register_buffer("hash_table", torch.empty(vocab_size, cfg.top_k))
        if kind == "relu":
            self.register_buffer("l1_coef", torch.empty((), dtype=torch.float64))
            # (sum of active experts over tokens, tokens) since the last update
            self.register_buffer("active_seen", torch.zeros(2, dtype=torch.float64), persistent=False)
        if kind == "reinforce":
            self.register_buffer("loss_baseline", torch.zeros((), dtype=torch.float64))
            self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.float64))
            # (sum of per-token losses, tokens) since the last update
            self.register_buffer("loss_seen", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load_seen", torch.zeros(num_experts), persistent=False)
        # False while activation checkpointing replays a forward: its tokens were counted once
        self.count_load = True
        self.token_ids: Optional[torch.Tensor] = None
        if not self.expert_bias.is_meta:
            self.init_buffers(self.expert_bias.device, fresh=True)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None, fresh: bool = False) -> None:
        """The initial values of the state that has one (the hash table, the L1 coefficient), on
        ``device``: into the buffers still on the meta device (a model built on meta,
        ``Transformer.init_buffers``), or into all of them when ``fresh`` (construction). Neither
        draws from the global RNG, so a model built on meta and one built eagerly agree."""
        initial = {}
        if "hash_table" in self._buffers:
            V, K = self._buffers["hash_table"].shape
            initial["hash_table"] = lambda: random_hash_table(V, self.num_experts, K).float()
        if "l1_coef" in self._buffers:
            initial["l1_coef"] = lambda: torch.tensor(self.cfg.relu_l1_coef, dtype=torch.float64, device="cpu")
        for name, value in initial.items():
            if fresh or self._buffers[name].is_meta:
                self._buffers[name] = value().to(device)

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that a cast (``model.to(torch.bfloat16)``) never
        rounds the hash table's expert ids: it keeps float32 and only follows the device."""
        table = self._buffers.get("hash_table")
        out = super()._apply(fn, recurse)
        if table is not None and self.hash_table.dtype != table.dtype:
            self.hash_table = table.to(self.hash_table.device)
        return out

    def forward(self, x_ND: torch.Tensor, token_ids_N: Optional[torch.Tensor] = None,
                group_size: Optional[int] = None, col_reducer: Optional[Reducer] = None) -> Routing:
        """Route N tokens. ``token_ids_N``: their token ids (the hash rule; default the ids the
        model last embedded); ``group_size``: tokens per sequence (expert choice picks within
        each; default all N); ``col_reducer``: sums over data-parallel ranks (Sinkhorn's column
        totals)."""
        kind, cfg = self.cfg.router, self.cfg
        if kind == "hash":
            return hash_route(self.hash_table, self._token_ids(x_ND, token_ids_N), self.num_experts)
        dtype = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
        x = x_ND.to(dtype)
        logits_NE = F.linear(x, self.gate.to(dtype))
        if kind == "noisy" and self.training:
            noise_std_NE = F.softplus(F.linear(x, self.noise.to(dtype)))
            logits_NE = logits_NE + torch.randn_like(logits_NE) * noise_std_NE
        if kind == "relu":
            routing = relu_route(logits_NE)
            self._count_active(routing)
            return routing
        if kind == "expert_choice":
            factor = cfg.capacity_factor
            if not self.training and cfg.eval_capacity_factor is not None:
                factor = cfg.eval_capacity_factor
            factor = 1.0 if factor is None else factor                 # none: capacity factor 1
            return expert_choice_route(logits_NE, cfg.top_k, factor, group_size or x_ND.shape[0])
        if kind == "reinforce" and self.training:
            return self._count_load(sampled_route(logits_NE, cfg))
        select_NE = None
        if kind == "sinkhorn" and self.training:
            select_NE = sinkhorn_balance(logits_NE, cfg.sinkhorn_iters, col_reducer)
        group_logits_NG = F.linear(x, self.group_gate.to(dtype)) if cfg.group_router == "learned" else None
        # Decided from the config, not the buffer's values, so the hot path never syncs.
        use_bias = kind == "sigmoid" or cfg.bias_update_rate > 0
        routing = route(logits_NE, cfg, self.expert_bias if use_bias else None, group_logits_NG, select_NE)
        return self._count_load(routing)

    def _token_ids(self, x_ND: torch.Tensor, token_ids_N: Optional[torch.Tensor]) -> torch.Tensor:
        ids = token_ids_N if token_ids_N is not None else self.token_ids
        if ids is None or ids.numel() != x_ND.shape[0]:
            got = "none" if ids is None else f"{ids.numel()}"
            raise ValueError(f"router 'hash' needs the token id of each of the {x_ND.shape[0]} "
                             f"tokens (got {got}): pass token_ids, or run the layer inside a "
                             "Transformer, whose embedding supplies them")
        return ids.reshape(-1).to(self.hash_table.device)

    def _count_load(self, routing: Routing) -> Routing:
        if self.training and self.cfg.bias_update_rate > 0 and self.count_load:
            with torch.no_grad():
                self.load_seen += expert_histogram(routing.ids_NK, self.num_experts)
        return routing

    def _count_active(self, routing: Routing) -> None:
        if self.training and self.count_load:
            with torch.no_grad():
                keep_NE = routing.keep_NK
                tokens = keep_NE.new_tensor(keep_NE.shape[0], dtype=torch.float64)
                self.active_seen += torch.stack([keep_NE.sum().double(), tokens])

    def policy_loss(self, logprob_N: torch.Tensor, token_loss_N: torch.Tensor) -> torch.Tensor:
        """REINFORCE's surrogate loss for this layer, reinforce_coef * mean_n[(loss_n - b) *
        log pi_n]: its gradient is the policy gradient with reward -loss_n and baseline -b, b the
        running mean loss (the batch mean until one step has been seen). Records the losses for
        the baseline's update."""
        loss_N = token_loss_N.detach().to(logprob_N.dtype)
        batch_mean = loss_N.mean()
        baseline = torch.where(self.baseline_ready > 0, self.loss_baseline.to(loss_N.dtype), batch_mean)
        if self.training:
            with torch.no_grad():
                self.loss_seen += torch.stack([loss_N.sum().double(),
                                               loss_N.new_tensor(loss_N.shape[0], dtype=torch.float64)])
        return self.cfg.reinforce_coef * ((loss_N - baseline) * logprob_N).mean()

    @torch.no_grad()
    def update_bias(self, count_reducer: Optional[Reducer] = None) -> None:
        """Per-optimiser-step updates of the router's state; call once per step. ``count_reducer``
        sums over data-parallel ranks, so that every rank applies the same update.
        - bias_update_rate > 0: b_i += rate * sign(mean load - load_i) over the load seen since the
          last call (DeepSeek-V3, section 2.1.2);
        - reinforce: the loss baseline moves toward the mean loss seen."""
        reduce = (lambda t: t) if count_reducer is None else count_reducer
        if self.cfg.router == "reinforce":
            total, tokens = reduce(self.loss_seen).unbind()
            seen = tokens > 0
            mean = total / tokens.clamp_min(1)
            decay = self.cfg.reinforce_baseline_decay
            ready = self.baseline_ready > 0
            moved = torch.where(ready, decay * self.loss_baseline + (1 - decay) * mean, mean)
            self.loss_baseline.copy_(torch.where(seen, moved, self.loss_baseline))
            self.baseline_ready.copy_(torch.where(seen | ready, 1.0, 0.0))
            self.loss_seen.zero_()
        if self.cfg.bias_update_rate <= 0:
            return
        load = reduce(self.load_seen)
        # no "any load seen?" test: it would be a host sync per layer and step on CUDA, and with
        # no load the error is 0 everywhere, so sign(0) = 0 leaves the biases as they are
        error = load.mean() - load
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(error)
        self.load_seen.zero_()


@torch.no_grad()
def adapt_relu_l1(routers: list[Router], count_reducer: Optional[Reducer] = None) -> None:
    """ReMoE's adaptive L1 coefficient (Wang et al. 2025, eq. 6), once per optimiser step: one
    coefficient for the whole model, multiplied by relu_l1_factor when the active experts per token,
    averaged over every ReLU layer's tokens since the last call, exceed top_k, and divided by it
    when they fall short. Each layer keeps a copy (they stay equal), so the state dict holds it.
    Individual layers may sit above or below the target: ReMoE lets computation move between layers."""
    routers = [r for r in routers if r.cfg.router == "relu"]
    if not routers:
        return
    seen = torch.stack([r.active_seen for r in routers]).sum(dim=0)
    active, tokens = (seen if count_reducer is None else count_reducer(seen)).unbind()
    # no tokens seen (evaluation only): sign(0) leaves the coefficient as it is
    error = torch.where(tokens > 0, active / tokens.clamp_min(1) - routers[0].cfg.top_k, 0.0)
    factor = routers[0].cfg.relu_l1_factor ** torch.sign(error)
    for r in routers:
        r.l1_coef *= factor
        r.active_seen.zero_()


# the seed of the "random" hash: a fixed function of the token id, the same in every run and build
RANDOM_HASH_SEED = 0


def random_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int = RANDOM_HASH_SEED) -> torch.Tensor:
    """(V, K) int64 on the CPU: K distinct experts per token id, uniformly at random from a
    generator of its own (the "random" hash, and the placeholder a "balanced" table starts from
    until it is fitted); the global RNG is untouched."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scores_VE = torch.rand(vocab_size, num_experts, generator=generator, device="cpu")
    return scores_VE.topk(top_k, dim=-1).indices
