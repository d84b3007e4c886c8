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

from moelab.config import ConfigError, ModelConfig, MoEConfig, _validate_moe, from_dict
from moelab.model.ffn import SwiGLU
from moelab.model.moe import losses
from moelab.model.moe.dispatch import LocalDispatcher, plan_dispatch
from moelab.model.moe.engines import infer_experts
from moelab.model.moe.experts import GroupedExperts
from moelab.model.moe.router import Router, capacity, capacity_keep_mask


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
                 expert_hidden: Optional[int] = None, *, config: Optional[MoEConfig] = None,
                 init_std: float = 0.02, backend: str = "auto", layer: int = -1, **options: Any):
        super().__init__()
        cfg = config if config is not None else _moe_config(
            d_model, num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, **options)
        if config is None:
            _validate_standalone(d_model, cfg)
        E = num_experts if (config is not None and num_experts is not None) else cfg.num_experts
        self.cfg, self.d_model, self.num_experts = cfg, d_model, E
        self.layer = layer                       # its block's index, for the statistics (-1 alone)
        self.router = Router(d_model, E, cfg)
        self.experts = GroupedExperts(E, d_model, cfg.expert_hidden, backend=backend)
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
        nn.init.normal_(self.router.gate, std=std)
        nn.init.normal_(self.experts.w_gate_up, std=std)
        nn.init.normal_(self.experts.w_down, std=out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.gate_up.weight, std=std)
            nn.init.normal_(self.shared.down.weight, std=out_std)
            if self.shared_gate is not None:
                nn.init.normal_(self.shared_gate.weight, std=std)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared experts (DeepSeekMoE), gated by sigmoid(x w) when configured
        (Qwen2-MoE). Only valid when the layer has shared experts."""
        out = self.shared(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def _capacity_factor(self) -> Optional[float]:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"MoE expects last dim {self.d_model}, got input of shape {tuple(shape)}")
        x_ND = x.reshape(-1, self.d_model)
        N, E, K = x_ND.shape[0], self.num_experts, self.cfg.top_k

        routing = self.router(x_ND)
        factor = self._capacity_factor()
        keep_NK = None
        if factor is not None:
            keep_NK = capacity_keep_mask(routing, E, capacity(N, E, K, factor), self.cfg.drop_policy)
        plan = plan_dispatch(routing, E, keep_NK)
        out_ND = self.dispatcher(x_ND, plan, self.experts)                  # (N, D)

        if self.shared is not None:
            out_ND = out_ND + self.shared_output(x_ND)

        aux_loss, loss_values = self._aux_losses(routing, shape)
        with torch.no_grad():
            dropped = (1.0 - keep_NK.float().mean()) if keep_NK is not None else x_ND.new_zeros(())
            stats = RouterStats(
                tokens_per_expert=plan.counts_E.detach(),
                dropped_fraction=dropped.float(),
                entropy=losses.router_entropy(routing.probs_NE),
                expert_ids=routing.ids_NK.detach(),
                losses={k: v.detach() for k, v in loss_values.items()},
                layer=self.layer,
            )
        return MoEOutput(out_ND.view(shape), aux_loss, stats)

    def infer(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer for inference: ((N, D) output, (N, K) expert ids). Same routing and experts
        as ``forward``, but always dropless (a dropped token's output would depend on which
        other tokens share its batch, so cached decoding would stop equalling a full forward),
        with no aux losses or statistics, on the engine ``engines.choose_engine`` picks."""
        routing = self.router(x_ND)
        out_ND = infer_experts(self.experts, x_ND, routing)
        if self.shared is not None:
            out_ND = out_ND + self.shared_output(x_ND)
        return out_ND, routing.ids_NK

    def _aux_losses(self, routing, shape) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, E = self.cfg, self.num_experts
        values: dict[str, torch.Tensor] = {}
        total = routing.logits_NE.new_zeros(())
        # The balance loss is always measured (it is cheap and the logs report it); it joins the
        # total only with a positive coefficient.
        counts_E = losses.expert_counts(routing.ids_NK, E)
        if cfg.balance_scope == "global" and self.count_reducer is not None:
            counts_E = self.count_reducer(counts_E)
        values["balance_loss"] = losses.switch_balance_loss(routing.probs_NE, counts_E, E)
        if cfg.aux_loss_coef > 0:
            total = total + cfg.aux_loss_coef * values["balance_loss"]
        if cfg.seq_aux_loss_coef > 0:
            B = shape[0] if len(shape) == 3 else 1
            values["seq_balance_loss"] = losses.sequence_balance_loss(
                routing.probs_NE.view(B, -1, E), routing.ids_NK.view(B, -1, cfg.top_k), E)
            total = total + cfg.seq_aux_loss_coef * values["seq_balance_loss"]
        if cfg.z_loss_coef > 0:
            values["z_loss"] = losses.router_z_loss(routing.logits_NE)
            total = total + cfg.z_loss_coef * values["z_loss"]
        return total, values

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer written per token: route, then for every token add each kept choice's
        expert output times its weight. Slow and plain; the fast path is tested against it."""
        x_ND = x.reshape(-1, self.d_model)
        N, E, K = x_ND.shape[0], self.num_experts, self.cfg.top_k
        routing = self.router(x_ND)
        factor = self._capacity_factor()
        keep_NK = torch.ones_like(routing.ids_NK, dtype=torch.bool)
        if factor is not None:
            keep_NK = capacity_keep_mask(routing, E, capacity(N, E, K, factor), self.cfg.drop_policy)
        rows = []
        for n in range(N):
            y_D = x_ND.new_zeros(self.d_model)
            for k in range(K):
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
                        moe=dataclasses.replace(cfg, layers="all", every=1, first_dense=0,
                                                num_experts_per_layer=None))
    if d_model < 1:
        raise ConfigError(f"MoE.d_model = {d_model!r} is invalid: must be > 0")
    _validate_moe(probe, "MoE")
