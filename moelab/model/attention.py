"""Attention: grouped-query attention and Multi-head Latent Attention, with static KV caches;
the rotary embeddings they apply live in ``moelab.model.rope``.

Legend: B batch, T new tokens, S cached positions (keys), H query heads, G key/value heads,
Dh head dim, R MLA latent rank, Dr RoPE dim of MLA.

Both attention kinds run on ``F.scaled_dot_product_attention``, causal for a decoder and
bidirectional (every query sees every key) for an encoder (``model.causal = false``). The caches are pre-allocated
buffers written in place at the current slot, so decoding never concatenates the whole cache.
MLA caches only the compressed latent and the shared RoPE key (DeepSeek-V2, section 2.1), which is
what makes its cache small; keys and values are re-expanded from the latent when attending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.model.norm import RMSNorm
from moelab.model.rope import apply_rope, softmax_scale_factor


# ---------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------

@dataclass
class AttentionContext:
    """What every layer needs about the positions of this forward call.

    ``cos``/``sin``: (B or 1, 1, T, Dr) RoPE tables at each query's position.
    ``mask``: (B, 1, T, S) boolean, True where a query may attend a key; None means plain causal
    attention over the T new tokens (training and full-sequence scoring), or no mask at all when
    ``causal`` is False (an encoder: every position sees the whole sequence).
    ``start``: the cache slot of the first of the T new tokens.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor] = None
    start: int = 0
    causal: bool = True

    def rotation_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin with its first half negated), both (B or 1, T, 1, Dr): RoPE as
        ``x * cos + swap_halves(x) * signed_sin`` in the (B, T, heads, Dr) layout. Made on first
        use and shared by every layer of the forward call."""
        tables = self.__dict__.get("_rotation_tables")
        if tables is None:
            half = self.sin.shape[-1] // 2
            signed_sin = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1)
            tables = (self.cos.transpose(1, 2), signed_sin.transpose(1, 2))
            self.__dict__["_rotation_tables"] = tables
        return tables


class KVCache(nn.Module):
    """Static key/value buffers of one GQA layer: (B, G, S_max, Dh) each."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class LatentCache(nn.Module):
    """MLA cache: compressed KV latent (B, S_max, R) and RoPE key (B, S_max, Dr)."""

    def __init__(self, batch: int, max_len: int, kv_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("c_kv", torch.zeros(batch, max_len, kv_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("k_rope", torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + c_kv.shape[1]
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        return self.c_kv[:, :end], self.k_rope[:, :end]


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 2) -> int:
    """KV-cache bytes one token occupies across all layers."""
    if cfg.attention == "mla":
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.kv_heads * cfg.attn_head_dim
    return per_layer * cfg.n_layers * bytes_per_elem


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
            scale: Optional[float] = None) -> torch.Tensor:
    """SDPA over (B, H, T, Dh) queries and (B, G, S, Dh) keys; G may divide H (GQA)."""
    gqa = k.shape[1] != q.shape[1]
    if ctx.mask is None:
        # Without a mask the queries are the last T of the S keys with S == T, or a lone query
        # (decoding) that sees every cached key; SDPA's causal mask is top-left aligned, so a
        # lone query must not use it. An encoder's queries see every key: no mask at all.
        causal = ctx.causal and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# Grouped-query attention (MHA when G == H, MQA when G == 1)
# ---------------------------------------------------------------------------------------------

class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.attn_bias)   # fused q | k | v
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":      # Qwen3: per-head RMSNorm
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":    # OLMoE: over the whole projection
            self.q_norm = RMSNorm(self.n_heads * self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * self.head_dim, cfg.norm_eps)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qk_norm == "none" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._forward_eager_no_grad(x, ctx, cache)
        q, k, v = self.qkv(x).split([H * Dh, G * Dh, G * Dh], dim=-1)       # (B, T, ·)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, H, Dh).transpose(1, 2)                              # (B, H, T, Dh)
        k = k.view(B, T, G, Dh).transpose(1, 2)                              # (B, G, T, Dh)
        v = v.view(B, T, G, Dh).transpose(1, 2)                              # (B, G, T, Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update(ctx.start, k, v)                             # (B, G, S, Dh)
        y = _attend(q, k, v, ctx)                                            # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))

    def _forward_eager_no_grad(self, x: torch.Tensor, ctx: AttentionContext,
                               cache: Optional[KVCache]) -> torch.Tensor:
        """``forward`` for eager inference without q/k norms: the same numbers in fewer ops (a
        decoded token's attention is a few dozen tiny ops, each costing more to launch than to
        run), by rotating the q and k heads of the fused projection together, with the tables
        of ``ctx.rotation_tables``. (Compiled code fuses the ops instead.)"""
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * G, Dh)                          # (B, T, H+2G, Dh)
        cos, signed_sin = ctx.rotation_tables()                             # (·, T, 1, Dh)
        qk = qkv[:, :, :H + G]                                               # (B, T, H+G, Dh)
        swapped = qk.unflatten(-1, (2, Dh // 2)).flip(-2).flatten(-2)        # halves swapped
        qk = torch.addcmul(qk * cos, swapped, signed_sin).to(x.dtype)       # as rope.apply_rope
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)   # (B, H|G, T, Dh)
        v = qkv[:, :, H + G:].transpose(1, 2)                                # (B, G, T, Dh)
        if cache is not None:
            k, v = cache.update(ctx.start, k, v)                             # (B, G, S, Dh)
        y = _attend(q, k, v, ctx)                                            # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention (DeepSeek-V2)
# ---------------------------------------------------------------------------------------------

class MultiHeadLatentAttention(nn.Module):
    """Keys and values come from a shared low-rank latent c_kv = norm(W_dkv x); a separate small
    key part k_rope carries position (decoupled RoPE) and is shared by all heads. Queries are
    optionally low-rank too (q_lora_rank). Only c_kv and k_rope are cached."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.mla
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = (
            a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank)
        q_dim = self.n_heads * (self.nope + self.rope)
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=False)
        else:
            self.q_down = nn.Linear(cfg.d_model, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.q_up = nn.Linear(a.q_lora_rank, q_dim, bias=False)
        self.kv_down = nn.Linear(cfg.d_model, self.kv_rank + self.rope, bias=False)  # c_kv | k_rope
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.kv_up = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.out = nn.Linear(self.n_heads * self.v_dim, cfg.d_model, bias=False)
        self.softmax_scale = (self.nope + self.rope) ** -0.5 * softmax_scale_factor(cfg.rope_scaling)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache:
        return LatentCache(batch, max_len, self.kv_rank, self.rope, dtype, device)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: Optional[LatentCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)           # (B, H, T, nope+Dr)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin)

        c_kv, k_rope = self.kv_down(x).split([self.kv_rank, self.rope], dim=-1)  # (B, T, R), (B, T, Dr)
        c_kv = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope.unsqueeze(1), ctx.cos, ctx.sin).squeeze(1)   # (B, T, Dr)
        if cache is not None:
            c_kv, k_rope = cache.update(ctx.start, c_kv, k_rope)              # (B, S, R), (B, S, Dr)
        S = c_kv.shape[1]
        kv = self.kv_up(c_kv).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)  # (B, H, S, ·)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, S, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)                              # (B, H, T, nope+Dr)
        y = _attend(q, k, v, ctx, scale=self.softmax_scale)                  # (B, H, T, Dv)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
