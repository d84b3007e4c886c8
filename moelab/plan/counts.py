"""What a model is on paper: parameters (embedding and head apart, routed experts apart), FLOPs
per token, KV-cache bytes, and the FSDP units a layout all-gathers, from ``moelab.accounting``'s
formulas. Nothing is built, so a 671B config takes microseconds.

FLOPs per token follow Kaplan et al. (2020) and Narayanan et al. (2021, "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM"): the forward costs 2 FLOPs per
multiply-accumulate of every active matmul weight plus attention's QK^T and AV at the sequence
length (causal: position t attends to t + 1 keys); the backward costs twice the forward, so a
training step costs 3x the forward, and 4x when activation checkpointing recomputes the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.accounting import attention_params, ffn_params, flops_per_token, param_counts
from moelab.config import ModelConfig


@dataclass(frozen=True)
class Unit:
    """One FSDP unit as moelab wraps them: each block (its experts a unit of their own under
    expert parallelism, gathered with it), and the root (embedding, final norm, LM head)."""

    name: str
    params: int          # everything but routed experts: sharded over dp_shard
    routed: int = 0      # routed expert weights: split over ep, then sharded over dp_shard / ep


@dataclass(frozen=True)
class ModelCounts:
    total_params: int
    active_params: int
    embedding_params: int
    head_params: int                 # 0 when tied to the embedding
    routed_expert_params: int        # all routed experts of all MoE layers
    moe_layers: int
    dense_layers: int
    top_k: int
    d_model: int
    forward_flops_per_token: int     # matmuls + attention at the planned sequence length
    attention_flops_per_token: int
    kv_cache_bytes_per_token: int    # bf16; MLA caches its latent and RoPE key only
    units: tuple[Unit, ...]          # the root first, then the blocks
    mtp_params: int = 0              # DeepSeek-V3 MTP modules (not in total_params)

    @property
    def non_expert_params(self) -> int:
        return self.total_params - self.routed_expert_params

    @property
    def training_flops_per_token(self) -> int:
        """Model FLOPs of one training token (forward + backward), as MFU counts them."""
        return 3 * self.forward_flops_per_token

    def hardware_flops_per_token(self, activation_checkpointing: bool) -> int:
        """What the GPUs execute: checkpointing runs the forward a second time."""
        return (4 if activation_checkpointing else 3) * self.forward_flops_per_token

    def as_dict(self) -> dict:
        return {
            "total_params": self.total_params, "active_params": self.active_params,
            "embedding_params": self.embedding_params, "head_params": self.head_params,
            "routed_expert_params": self.routed_expert_params,
            "non_expert_params": self.non_expert_params, "moe_layers": self.moe_layers,
            "dense_layers": self.dense_layers, "mtp_params_not_counted": self.mtp_params,
            "forward_flops_per_token": self.forward_flops_per_token,
            "attention_flops_per_token": self.attention_flops_per_token,
            "training_flops_per_token": self.training_flops_per_token,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
        }


def count(cfg: ModelConfig, seq_len: int, mtp_layers: int = 0) -> ModelCounts:
    from moelab.model.attention import cache_bytes_per_token
    counts = param_counts(cfg)
    flops = flops_per_token(cfg, seq_len)
    D = cfg.d_model
    attn = attention_params(cfg) + 2 * D                   # + the block's two norms
    units = [Unit("root", counts["embedding"] + D + counts["head"])]
    routed_total, moe_layers, top_k = 0, 0, 0
    for i in range(cfg.n_layers):
        f = ffn_params(cfg, i)
        routed_total += f.routed
        moe_layers += f.experts > 0
        top_k = max(top_k, f.top_k)
        units.append(Unit(f"block {i}", attn + f.dense + f.router + f.shared, f.routed))
    mtp = 0
    if mtp_layers:
        # DeepSeek-V3 sec. 2.2: each MTP module is one more (MoE) block, a 2D -> D projection and
        # two RMSNorms, sharing the embedding and head (plus the norm before the shared head)
        f = ffn_params(cfg, cfg.n_layers - 1)
        mtp = mtp_layers * (attn + f.total + 2 * D * D + 3 * D)
    return ModelCounts(
        total_params=counts["total"], active_params=counts["active"],
        embedding_params=counts["embedding"], head_params=counts["head"],
        routed_expert_params=routed_total, moe_layers=moe_layers,
        dense_layers=cfg.n_layers - moe_layers, top_k=top_k, d_model=D,
        forward_flops_per_token=flops["total"], attention_flops_per_token=flops["attention"],
        kv_cache_bytes_per_token=cache_bytes_per_token(cfg, 2), units=tuple(units), mtp_params=mtp)
