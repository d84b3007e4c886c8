"""The MoE feed-forward layer: router -> dispatch -> grouped experts -> combine, plus shared
experts. Usable on its own (``moelab.MoE``) on any (N, D) or (B, T, D) input.

Legend: N tokens, D width, E experts, K experts per token, M dispatched rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from moelab.config import (
    SEQUENCE_ROUTER_KINDS, VARIABLE_ROUTER_KINDS, ConfigError, ModelConfig, MoEConfig, _validate_moe,
    from_dict,
)
from moelab.model.ffn import SwiGLU
from moelab.model.moe import losses
from moelab.model.moe.dispatch import LocalDispatcher, plan_dispatch
from moelab.model.moe.engines import infer_experts
from moelab.model.moe.experts import GroupedExperts
from moelab.model.moe.hetero import HeteroExperts
from moelab.model.moe.router import Router, Routing, capacity, capacity_keep_mask


def load_cv(tokens_per_expert_E: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
    load = tokens_per_expert_E.float()
    return float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))


def max_over_mean(tokens_per_expert_E: torch.Tensor) -> float:
    """The busiest expert's load over the mean load (1 = perfectly balanced)."""
    load = tokens_per_expert_E.float()
    return float(load.max() / load.mean().clamp_min(1e-9))


@dataclass
class RouterStats:
    """Routing measurements of one MoE layer for one forward call; tensors are detached and stay
    on their device until someone reads them (no host sync in the forward)."""

    tokens_per_expert: torch.Tensor   # (E,) assignments kept per expert
    dropped_fraction: torch.Tensor    # scalar: dropped assignments / all assignments
    entropy: torch.Tensor             # scalar: mean router entropy (nats)
    expert_ids: torch.Tensor          # (N, K) chosen experts, for traces (--show-experts)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted aux losses
    layer: int = -1
    # variable routers (expert_choice, relu): expert_ids is (N, E), each token's experts by
    # falling weight, and this (N, E) bool says which of them the token used; None = all of them
    expert_mask: Optional[torch.Tensor] = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # router-specific measurements
    # reinforce (training): log-probability of each token's sampled experts, (N,), WITH gradient;
    # the model turns it into the policy-gradient loss once the per-token losses are known
    policy_logprob: Optional[torch.Tensor] = None

    @property
    def load_cv(self) -> float:
        return load_cv(self.tokens_per_expert)

    @property
    def max_over_mean(self) -> float:
        return max_over_mean(self.tokens_per_expert)

    def averages(self) -> dict[str, float]:
        """The statistics that average over processes (fractions, entropy, unweighted losses);
        the load ones come from summed loads instead."""
        out = {"dropped_fraction": float(self.dropped_fraction), "entropy": float(self.entropy)}
        out.update({k: float(v) for k, v in self.losses.items()})
        out.update({k: float(v) for k, v in self.metrics.items()})
        return out

    def summary(self) -> dict[str, float]:
        return {"load_cv": self.load_cv, "max_over_mean": self.max_over_mean, **self.averages()}


@dataclass
class MoEOutput:
    output: torch.Tensor     # same shape as the input
    aux_loss: torch.Tensor   # scalar: sum of coefficient * loss; add it to the task loss
    stats: RouterStats


class MoE(nn.Module):
    """Mixture-of-experts FFN.

    ``MoE(d_model=512, num_experts=8, top_k=2, expert_hidden=1024, router="sigmoid", ...)``:
    any :class:`moelab.config.MoEConfig` field is an option. Returns :class:`MoEOutput`; its
    ``output`` has the input's shape and ``aux_loss`` is never added for you.
    """

    def __init__(self, d_model: int, num_experts: Optional[int] = None, top_k: Optional[int] = None,
                 expert_hidden: Optional[int | tuple[int, ...]] = None, *, config: Optional[MoEConfig] = None,
                 init_std: float = 0.02, backend: str = "auto", layer: int = -1,
                 vocab_size: Optional[int] = None, **options: Any):
        super().__init__()
        cfg = config if config is not None else _moe_config(
            d_model, num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, **options)
        if config is None:
            _validate_standalone(d_model, cfg)
        E = num_experts if (config is not None and num_experts is not None) else cfg.num_experts
        self.cfg, self.d_model, self.num_experts = cfg, d_model, E
        self.layer = layer                       # its block's index, for the statistics (-1 alone)
        self.router = Router(d_model, E, cfg, vocab_size)     # vocab_size: the hash router's table
        if cfg.heterogeneous:
            self.experts = HeteroExperts(cfg.expert_widths(E), d_model, backend=backend)
        else:
            self.experts = GroupedExperts(E, d_model, cfg.expert_hidden, backend=backend)
        self.register_buffer("expert_widths", torch.tensor(cfg.expert_widths(E)), persistent=False)
        if cfg.num_shared_experts > 0:
            width = cfg.num_shared_experts * (cfg.shared_expert_hidden or cfg.expert_hidden)
            self.shared = SwiGLU(d_model, width)
            self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        else:
            self.shared = None
        # How tokens reach the experts: fused and local here; an all-to-all over the expert-
        # parallel ranks once ``moelab.parallel`` spreads the experts (same call, no branch below).
        self.dispatcher = LocalDispatcher()
        # Sums per-expert counts over the data-parallel ranks: for global-batch balancing and for
        # the DeepSeek-V3 bias update, which every rank must apply alike. Identity in one process.
        self.count_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02, out_std: Optional[float] = None) -> None:
        out_std = std if out_std is None else out_std
        for name in ("gate", "group_gate"):           # a hash router has no gate
            if hasattr(self.router, name):
                nn.init.normal_(getattr(self.router, name), std=std)
        if isinstance(self.experts, HeteroExperts):
            self.experts.reset_parameters(std, out_std)
        else:
            nn.init.normal_(self.experts.w_gate_up, std=std)
            nn.init.normal_(self.experts.w_down, std=out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.gate_up.weight, std=std)
            nn.init.normal_(self.shared.down.weight, std=out_std)
            if self.shared_gate is not None:
                nn.init.normal_(self.shared_gate.weight, std=std)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Give the buffers still on the meta device (a model built on meta) the values
        construction gives them: the experts' widths, the router's state (``Router.init_buffers``)."""
        if self.expert_widths.is_meta:
            self.expert_widths = torch.tensor(self.cfg.expert_widths(self.num_experts), device=device)
        self.router.init_buffers(device)
        if isinstance(self.experts, HeteroExperts):
            self.experts.init_buffers(device)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared experts (DeepSeekMoE), gated by sigmoid(x w) when configured
        (Qwen2-MoE). Only valid when the layer has shared experts."""
        out = self.shared(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def _capacity_factor(self) -> Optional[float]:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def _route(self, x_ND: torch.Tensor, shape: torch.Size, token_ids: Optional[torch.Tensor]) -> Routing:
        """The router's choices; ``group_size`` = tokens per sequence (expert choice picks within
        each), and Sinkhorn balances over every data-parallel rank's tokens."""
        group_size = shape[-2] if len(shape) == 3 else x_ND.shape[0]
        reducer = self.count_reducer if self.cfg.router == "sinkhorn" else None
        return self.router(x_ND, token_ids, group_size, reducer)

    def _keep_mask(self, routing: Routing, num_tokens: int) -> Optional[torch.Tensor]:
        """Which assignments run: the variable routers' own choice, or, for token choice with a
        capacity, those within it; None = all."""
        if self.cfg.router in VARIABLE_ROUTER_KINDS:
            return routing.keep_NK
        factor = self._capacity_factor()
        if factor is None:
            return None
        slots = capacity(num_tokens, self.num_experts, self.cfg.top_k, factor)
        return capacity_keep_mask(routing, self.num_experts, slots, self.cfg.drop_policy)

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> MoEOutput:
        """``token_ids``: the token id of each row of ``x`` (hash routing; inside a Transformer
        its embedding supplies them)."""
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"MoE expects last dim {self.d_model}, got input of shape {tuple(shape)}")
        x_ND = x.reshape(-1, self.d_model)
        E = self.num_experts

        routing = self._route(x_ND, shape, token_ids)
        keep_NK = self._keep_mask(routing, x_ND.shape[0])
        plan = plan_dispatch(routing, E, keep_NK)
        out_ND = self.dispatcher(x_ND, plan, self.experts)                  # (N, D)

        if self.shared is not None:
            out_ND = out_ND + self.shared_output(x_ND)

        aux_loss, loss_values = self._aux_losses(routing, keep_NK, shape)
        with torch.no_grad():
            dropped = x_ND.new_zeros(())
            if keep_NK is not None and self.cfg.router not in VARIABLE_ROUTER_KINDS:
                dropped = 1.0 - keep_NK.float().mean()
            stats = RouterStats(
                tokens_per_expert=plan.counts_E.detach(),
                dropped_fraction=dropped.float(),
                entropy=losses.router_entropy(routing.probs_NE),
                expert_ids=routing.ids_NK.detach(),
                losses={k: v.detach() for k, v in loss_values.items()},
                layer=self.layer,
            )
            self._variable_stats(stats, routing, keep_NK)
        if routing.logprob_N is not None:
            stats.policy_logprob = routing.logprob_N
        return MoEOutput(out_ND.view(shape), aux_loss, stats)

    def infer(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer for inference: ((N, D) output, (N, K) expert ids). Same routing and experts
        as ``forward`` at evaluation, but always dropless (a dropped token's output would depend
        on which other tokens share its batch, so cached decoding would stop equalling a full
        forward), with no aux losses or statistics, on the engine ``engines.choose_engine`` picks.
        Variable routers (ReLU) run only each token's active experts; their ids are (N, E), each
        token's experts by falling weight, -1 past the ones it used. Expert choice picks tokens
        among all N rows given (an encoder's layer; decoding never reaches it)."""
        routing = self._route(x_ND, x_ND.shape, None)
        if self.cfg.router in VARIABLE_ROUTER_KINDS:
            keep_NK = routing.keep_NK
            out_ND = infer_experts(self.experts, x_ND, routing, keep_NK)
            order_NK = routing.weights_NK.argsort(dim=-1, descending=True, stable=True)
            ids_NK = routing.ids_NK.gather(1, order_NK).masked_fill(~keep_NK.gather(1, order_NK), -1)
        else:
            out_ND, ids_NK = infer_experts(self.experts, x_ND, routing), routing.ids_NK
        if self.shared is not None:
            out_ND = out_ND + self.shared_output(x_ND)
        return out_ND, ids_NK

    def _variable_stats(self, stats: RouterStats, routing: Routing, keep_NK: Optional[torch.Tensor]) -> None:
        """Per token, how many experts the variable routers used, and their experts by weight."""
        if self.cfg.router not in VARIABLE_ROUTER_KINDS:
            return
        order_NE = routing.weights_NK.detach().argsort(dim=-1, descending=True, stable=True)
        stats.expert_ids = routing.ids_NK.gather(1, order_NE)
        stats.expert_mask = keep_NK.gather(1, order_NE)
        stats.metrics.update(losses.active_expert_stats(keep_NK))
        if self.cfg.router == "relu":
            stats.metrics["l1_coef"] = self.router.l1_coef.detach().clone()

    def _aux_losses(self, routing: Routing, keep_NK: Optional[torch.Tensor],
                    shape) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, E, kind = self.cfg, self.num_experts, self.cfg.router
        values: dict[str, torch.Tensor] = {}
        total = routing.logits_NE.new_zeros(())
        if kind == "relu":
            # ReMoE: the load-balanced L1 loss with the adaptive coefficient replaces the Switch loss
            active_E = keep_NK.sum(dim=0).to(routing.weights_NK.dtype)
            tokens = active_E.new_tensor([float(keep_NK.shape[0])])
            counts = torch.cat([active_E, tokens])
            if cfg.balance_scope == "global" and self.count_reducer is not None:
                counts = self.count_reducer(counts)
            values["l1_loss"] = losses.relu_l1_loss(routing.weights_NK, counts[:E], counts[E], cfg.top_k)
            total = total + self.router.l1_coef.to(total.dtype) * values["l1_loss"]
        elif kind not in ("hash", "expert_choice"):
            # The balance loss is always measured (it is cheap and the logs report it); it joins
            # the total only with a positive coefficient.
            counts_E = losses.expert_counts(routing.ids_NK, E)
            if cfg.balance_scope == "global" and self.count_reducer is not None:
                counts_E = self.count_reducer(counts_E)
            values["balance_loss"] = losses.switch_balance_loss(routing.probs_NE, counts_E, E)
            if cfg.aux_loss_coef > 0:
                total = total + cfg.aux_loss_coef * values["balance_loss"]
            if cfg.size_penalty_coef > 0:
                values["size_penalty"] = losses.size_penalty_loss(routing.probs_NE, counts_E, self.expert_widths)
                total = total + cfg.size_penalty_coef * values["size_penalty"]
            if cfg.seq_aux_loss_coef > 0:
                B = shape[0] if len(shape) == 3 else 1
                values["seq_balance_loss"] = losses.sequence_balance_loss(
                    routing.probs_NE.view(B, -1, E), routing.ids_NK.view(B, -1, cfg.top_k), E)
                total = total + cfg.seq_aux_loss_coef * values["seq_balance_loss"]
        if cfg.z_loss_coef > 0:
            values["z_loss"] = losses.router_z_loss(routing.logits_NE)
            total = total + cfg.z_loss_coef * values["z_loss"]
        return total, values

    def reference_forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same layer written per token: route, then for every token add each kept choice's
        expert output times its weight. Slow and plain; the fast path is tested against it."""
        x_ND = x.reshape(-1, self.d_model)
        routing = self._route(x_ND, x.shape, token_ids)
        keep_NK = self._keep_mask(routing, x_ND.shape[0])
        if keep_NK is None:
            keep_NK = torch.ones_like(routing.ids_NK, dtype=torch.bool)
        rows = []
        for n in range(x_ND.shape[0]):
            y_D = x_ND.new_zeros(self.d_model)
            for k in range(routing.ids_NK.shape[1]):
                if keep_NK[n, k]:
                    e = int(routing.ids_NK[n, k])
                    y_D = y_D + routing.weights_NK[n, k].to(x.dtype) * self.experts.naive_expert(e, x_ND[n])
            if self.shared is not None:
                y_D = y_D + self.shared_output(x_ND[n])
            rows.append(y_D)
        return torch.stack(rows).view(x.shape)


def _moe_config(d_model: int, **options: Any) -> MoEConfig:
    return from_dict(MoEConfig, {k: v for k, v in options.items() if v is not None}, "MoE")


def _validate_standalone(d_model: int, cfg: MoEConfig) -> None:
    """Run the same checks as a full model config, with the layer pattern irrelevant."""
    probe = ModelConfig(d_model=d_model, n_heads=1, n_layers=1,
                        causal=cfg.router not in SEQUENCE_ROUTER_KINDS,   # a lone layer has no causality
                        moe=dataclasses.replace(cfg, layers="all", every=1, first_dense=0,
                                                num_experts_per_layer=None))
    if d_model < 1:
        raise ConfigError(f"MoE.d_model = {d_model!r} is invalid: must be > 0")
    _validate_moe(probe, "MoE")
