"""The transformer shared by Dense, MoE and Hybrid models: a decoder, or with
``model.causal = false`` an encoder (bidirectional attention, trained as a masked LM).

Legend: B batch, T tokens in this call, S cached positions, D width, V vocabulary, N scored
positions.

Each block is ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the only thing that makes a model
Dense, MoE or Hybrid is which FFN each layer gets (see ``ModelConfig.moe_layer_indices``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ConfigError, ModelConfig
from moelab.model.attention import AttentionContext, build_attention
from moelab.model.ffn import SwiGLU
from moelab.model.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from moelab.model.moe import MoE, MoEOutput, RouterStats
from moelab.model.norm import RMSNorm
from moelab.model.rope import rope_tables


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]           # (B, T, V); None when ``targets`` were given
    aux_loss: torch.Tensor                   # scalar: the MoE layers' weighted aux losses, summed
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, in order
    loss: Optional[torch.Tensor] = None      # scalar: mean cross-entropy over scored targets


class Cache:
    """Per-layer static caches plus where the next tokens go.

    Prompts of different lengths share one cache by left padding: row b's first ``pad_B[b]``
    slots are padding, which no query attends to, and its RoPE positions start after them.
    """

    def __init__(self, model: "Transformer", batch: int, max_len: int,
                 pad_B: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None):
        if not model.config.causal:
            raise ConfigError("model.causal = False: this model is an encoder (bidirectional "
                              "attention), and generation and the KV cache need a causal decoder; "
                              "score whole sequences with model(tokens) instead")
        if max_len > model.config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model context "
                             f"(max_seq_len={model.config.max_seq_len})")
        param = next(model.parameters())
        dtype = dtype or param.dtype
        self.layers = [blk.attn.new_cache(batch, max_len, dtype, param.device) for blk in model.blocks]
        self.max_len, self.pos = max_len, 0
        self.pad_B = pad_B.to(param.device) if pad_B is not None else \
            torch.zeros(batch, dtype=torch.long, device=param.device)
        # Known once here so that decoding an unpadded batch never builds a mask (one host read).
        self.padded = bool((self.pad_B > 0).any())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        n_experts = cfg.experts_in_layer(layer)
        self.is_moe = n_experts > 0
        if self.is_moe:
            self.ffn = MoE(cfg.d_model, n_experts, config=cfg.moe, layer=layer)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None
                ) -> tuple[torch.Tensor, Optional[MoEOutput]]:
        """(x, the MoE layer's output with its aux loss and router statistics; None in a dense
        layer)."""
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        if not self.is_moe:
            return x + self.ffn(self.ffn_norm(x)), None
        moe = self.ffn(self.ffn_norm(x))
        return x + moe.output, moe

    def step(self, x: torch.Tensor, ctx: AttentionContext, cache) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block for inference (``Transformer.step``): (x, the MoE layer's expert ids (B*T, K);
        None in a dense layer)."""
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        h = self.ffn_norm(x)                                                  # (B, T, D)
        if not self.is_moe:
            return x + self.ffn(h), None
        B, T, D = h.shape
        y_ND, ids_NK = self.ffn.infer(h.view(B * T, D))
        return x + y_ND.view(B, T, D), ids_NK


def _checkpointed(block: Block, x: torch.Tensor, ctx: AttentionContext):
    """``block(x, ctx)`` keeping only its input: the backward runs the forward again
    (torch.utils.checkpoint, non-reentrant; RNG state replayed, so noisy routing repeats). The
    replay must not count routed tokens a second time for the DeepSeek-V3 bias update."""
    from torch.utils.checkpoint import checkpoint

    @contextlib.contextmanager
    def replaying():
        router = block.ffn.router if block.is_moe else None
        if router is not None:
            router.count_load = False
        try:
            yield
        finally:
            if router is not None:
                router.count_load = True

    return checkpoint(block, x, ctx, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), replaying()))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)   # (L, Dr)
        self.register_buffer("rope_sin", sin, persistent=False)
        # recompute each block's activations in the backward instead of keeping them
        # (``parallel.activation_checkpointing``; training only)
        self.activation_checkpointing = False
        self.reset_parameters()

    # ---- parameters ---------------------------------------------------------------------------
    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.attn_head_dim
        return rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Compute the buffers no checkpoint holds (the RoPE tables, on the CPU as at construction,
        then moved to ``device``), and give every buffer still on the meta device its initial
        value, zeros (routers' balancing biases and load counts). For a model built on the meta
        device (``moelab.model.weights``)."""
        device = device if device is not None else self.embed.weight.device
        with torch.device("cpu"):
            cos, sin = self._rope_tables()
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for module in self.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_meta:
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std) everywhere, residual output projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith((".out", ".down"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                module.reset_parameters(std, out_std)

    def moe_layers(self) -> list[MoE]:
        return [blk.ffn for blk in self.blocks if blk.is_moe]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Apply DeepSeek-V3 aux-loss-free bias updates; call once per optimiser step."""
        for moe in self.moe_layers():
            moe.router.update_bias(moe.count_reducer)

    def new_cache(self, batch: int, max_len: Optional[int] = None,
                  pad_B: Optional[torch.Tensor] = None) -> Cache:
        return Cache(self, batch, max_len or self.config.max_seq_len, pad_B)

    # ---- forward ------------------------------------------------------------------------------
    def _context(self, B: int, T: int, device, cache: Optional[Cache]) -> AttentionContext:
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]                   # (T, Dr)
            return AttentionContext(cos[None, None], sin[None, None], causal=self.config.causal)
        start = cache.pos
        if start + T > cache.max_len:
            raise ValueError(f"cache full: {start} + {T} tokens exceed its {cache.max_len} slots")
        if not cache.padded and (T == 1 or start == 0):
            # No padding: positions are slots, and plain causal attention is right (prefill from
            # slot 0, or one decoded token that sees every cached key): no gather, no mask.
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, Dr)
            return AttentionContext(cos[None, None], sin[None, None], None, start)
        q_slot = torch.arange(start, start + T, device=device)                # (T,)
        k_slot = torch.arange(start + T, device=device)                       # (S,)
        pos_BT = (q_slot[None] - cache.pad_B[:, None]).clamp_min(0)           # (B, T)
        cos, sin = self.rope_cos[pos_BT].unsqueeze(1), self.rope_sin[pos_BT].unsqueeze(1)
        causal_TS = k_slot[None, :] <= q_slot[:, None]                        # (T, S)
        real_BS = k_slot[None, :] >= cache.pad_B[:, None]                     # (B, S)
        # a padding query may see itself, so its softmax is never over an empty set (no NaN)
        self_TS = k_slot[None, :] == q_slot[:, None]
        mask = (causal_TS[None] & real_BS[:, None]) | self_TS[None]           # (B, T, S)
        return AttentionContext(cos, sin, mask.unsqueeze(1), start)

    def forward(self, tokens: torch.Tensor, cache: Optional[Cache] = None,
                targets: Optional[torch.Tensor] = None) -> ModelOutput:
        """tokens (B, T) int64 -> ModelOutput with logits (B, T, V).

        With ``targets`` (B, T) the output holds the mean cross-entropy ``loss`` instead of the
        logits, computed by the fused LM head + loss (``linear_cross_entropy``), which never
        materialises the (B, T, V) logits. A target of ``IGNORE_INDEX`` is not scored: a masked
        LM's targets hold the original token at the selected positions and ``IGNORE_INDEX``
        elsewhere."""
        B, T = tokens.shape
        ctx = self._context(B, T, tokens.device, cache)
        x = self.embed(tokens)                                                # (B, T, D)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats: list[RouterStats] = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, moe = _checkpointed(block, x, ctx)
            else:
                x, moe = block(x, ctx, cache.layers[i] if cache is not None else None)
            if moe is not None:
                aux_loss = aux_loss + moe.aux_loss
                stats.append(moe.stats)
        if cache is not None:
            cache.pos += T
        if targets is not None:
            h = self.norm(x)                                                  # (B, T, D)
            if not self.config.causal:
                # A masked LM scores ~15% of the positions: handing the LM head only those rows
                # skips the rest of its work (one host read of the count, which a plain
                # boolean index needs).
                scored = targets != IGNORE_INDEX                              # (B, T)
                h, targets = h[scored], targets[scored]                       # (N, D), (N,)
            loss = linear_cross_entropy(h, self.lm_weight, targets)
            return ModelOutput(None, aux_loss, stats, loss)
        return ModelOutput(self.lm_logits(self.norm(x)), aux_loss, stats)

    @property
    def lm_weight(self) -> torch.Tensor:
        """The (V, D) output projection: the embedding when tied. The fused loss reads it
        directly (not through ``lm_head``'s forward), so a sharding wrapper must keep the head's
        parameters with the root module, as FSDP2 does by default."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normed hidden states (..., D) -> vocabulary logits (..., V), tied or not."""
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    # ---- inference ------------------------------------------------------------------------------
    def step(self, tokens_BT: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feed T new tokens per row into ``cache``: the next-token logits of the last position
        (B, V) and each MoE layer's expert ids (B*T, K). What generation calls for the prompt
        (prefill) and for every new token (decode). Unlike ``forward`` it skips what only training
        reads (aux losses, router statistics), projects only the last position to the
        vocabulary, and routes dropless whatever the capacity settings (``MoE.infer``); it equals
        ``forward`` on the whole sequence at every step (tests/test_generate.py).

        ``generate`` / ``stream`` (the sampling loop over this step) are added to the class by
        ``moelab.generate``, which sits above the model: ``model.generate(...)``."""
        B, T = tokens_BT.shape
        ctx = self._context(B, T, tokens_BT.device, cache)
        x = self.embed(tokens_BT)                                             # (B, T, D)
        expert_ids: list[torch.Tensor] = []
        for block, layer_cache in zip(self.blocks, cache.layers):
            x, ids_NK = block.step(x, ctx, layer_cache)
            if ids_NK is not None:
                expert_ids.append(ids_NK)
        cache.pos += T
        return self.lm_logits(self.norm(x[:, -1])), expert_ids                # (B, V)
