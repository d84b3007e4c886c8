"""Peak memory of one GPU in a training step under FSDP2 x expert parallelism.

Model states follow ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models") as FSDP2 lays them out: each rank keeps its shard of the parameters
in fp32, of the gradients in fp32 and of AdamW's two fp32 moments: 16 bytes per parameter divided
by the sharding degree (Megatron's theoretical memory, ``theoretical_memory_usage.py``, counts the
same 18 or 16 bytes for its distributed optimizer). Under expert parallelism every parameter is
still divided by ``dp_shard``: routed experts are split over ``ep`` ranks and sharded by FSDP
over the other ``dp_shard / ep`` (torchtitan's layout); what EP changes is the unsharded unit.

FSDP2 all-gathers one block at a time in the compute dtype and prefetches the next, keeps the root
unit (embedding, final norm, head) gathered from its forward to its backward, and holds a unit's
unsharded gradient for the reduce-scatter in fp32:
``(root + 2 x largest block) x compute bytes + largest unit x 4`` (routed experts counted 1/ep).

Activations count, per token and layer, every tensor autograd keeps for the backward, the method
of Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models",
sec. 4), applied to this model's block: no dropout, a fused attention kernel that keeps q, k, v,
its output and a log-sum-exp instead of the (T x T) scores, SwiGLU or MoE instead of GeLU.
See docs/plan.md for the term-by-term list. With activation checkpointing per block only each
block's input is kept, plus one block recomputed during its backward.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from moelab.accounting import ffn_params
from moelab.config import ModelConfig
from moelab.model.linear_cross_entropy import chunk_rows
from moelab.plan.counts import ModelCounts
from moelab.plan.inputs import Layout, Workload

ADAM_MOMENTS = 2
LSE_BYTES = 4           # fused attention's per-head log-sum-exp, fp32
ROUTER_BYTES = 4        # router logits and probabilities, fp32


@dataclass(frozen=True)
class MemoryBreakdown:
    params: int                  # sharded fp32 parameters
    gradients: int               # sharded fp32 gradients
    optimizer: int               # sharded AdamW moments
    gathered: int                # unsharded units in flight (2 params + 1 gradient)
    activations: int             # kept for the backward, one micro-batch
    loss: int                    # fused LM head + loss: dL/dh, dL/dW_head, one logits chunk
    alltoall_buffers: int        # one MoE layer's send and receive staging
    backward_workspace: int      # gradient of the block's largest tensor + the residual stream's two

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def block_activation_bytes(cfg: ModelConfig, layer: int, act: int) -> tuple[int, int]:
    """(bytes kept per token by one block, its largest single tensor per token in bytes)."""
    D, H = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        a = cfg.mla
        dqk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        q_path = 2 * a.q_lora_rank if a.q_lora_rank else 0         # q_down output, its norm
        tensors = [q_path, H * dqk,                                 # q
                   a.kv_lora_rank + a.qk_rope_head_dim,             # kv_down output (latent + rope key)
                   a.kv_lora_rank,                                  # normalised latent (kv_up input)
                   H * dqk, H * dv, H * dv]                         # k, v, attention output
    else:
        Dh, G = cfg.attn_head_dim, cfg.kv_heads
        tensors = [H * Dh, 2 * G * Dh, H * Dh]                      # q, k and v, attention output
    tensors += [2 * D, 2 * D]                                       # two norms: input and output each
    f = ffn_params(cfg, layer)
    extra = H * LSE_BYTES
    if f.experts:
        m = cfg.moe
        k, Hx = m.top_k, round(m.mean_expert_hidden)          # heterogeneous: the mean width
        shared = (m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)) if m.num_shared_experts else 0
        tensors += [k * D, 2 * k * Hx, k * Hx, k * D]              # dispatched rows, gate|up, product, outputs
        tensors += [2 * shared, shared]                             # shared experts: gate|up, product
        extra += 2 * f.experts * ROUTER_BYTES                       # router logits and probabilities
    else:
        tensors += [2 * cfg.ffn_hidden, cfg.ffn_hidden]             # gate|up, product
    return sum(tensors) * act + extra, max(tensors) * act


@functools.lru_cache(maxsize=64)
def _per_layer(cfg: ModelConfig, act: int) -> tuple[tuple[int, int], ...]:
    """Every block's activation bytes per token, once per model (a plan evaluates hundreds of
    layouts of the same model)."""
    return tuple(block_activation_bytes(cfg, i, act) for i in range(cfg.n_layers))


def loss_bytes(cfg: ModelConfig, tokens: int, wl: Workload) -> int:
    """moelab's fused linear cross-entropy finishes its gradients in the forward: it keeps dL/dh
    (N, D) and dL/dW (V, D) until the backward, and works on one (C, V) fp32 chunk of logits."""
    V, D = cfg.vocab_size, cfg.d_model
    chunk = chunk_rows(tokens, V)
    return tokens * D * wl.act_bytes + V * D * wl.compute_param_bytes + 2 * chunk * V * 4


def _gathered(counts: ModelCounts, layout: Layout, wl: Workload) -> int:
    """Unsharded parameters in flight: the root unit (FSDP2 keeps the root gathered from its
    forward to its backward), the current block and the prefetched next one, plus the largest
    unit's unsharded gradient before its reduce-scatter. Nothing is copied for a unit that is not
    sharded when it is already in the compute dtype (fp32 on one rank)."""
    copy_dense = layout.dp_shard > 1 or wl.mixed
    copy_expert = layout.expert_shard > 1 or wl.mixed
    root, *blocks = counts.units

    def unsharded(u) -> int:
        return (u.params if copy_dense else 0) + (u.routed // layout.ep if copy_expert else 0)

    block = max((unsharded(u) for u in blocks), default=0)
    grad = max(unsharded(u) for u in counts.units)
    return (unsharded(root) + 2 * block) * wl.compute_param_bytes + grad * wl.reduce_bytes


def memory(cfg: ModelConfig, counts: ModelCounts, layout: Layout, wl: Workload) -> MemoryBreakdown:
    s, e = layout.dp_shard, layout.ep
    P = counts.total_params
    params = -(-P * wl.master_bytes // s)
    optimizer = -(-P * ADAM_MOMENTS * 4 // s)
    tokens = layout.micro_batch * wl.seq_len

    gathered = _gathered(counts, layout, wl)

    per_layer = _per_layer(cfg, wl.act_bytes)
    if layout.activation_checkpointing:
        kept = cfg.n_layers * cfg.d_model * wl.act_bytes + max(b for b, _ in per_layer)
    else:
        kept = sum(b for b, _ in per_layer)
    kept += 2 * cfg.d_model * wl.act_bytes                         # final norm: input and output
    largest = max(t for _, t in per_layer)
    a2a = 0
    if e > 1 and counts.moe_layers:
        a2a = 2 * counts.top_k * cfg.d_model * wl.act_bytes * tokens
    return MemoryBreakdown(
        params=params, gradients=params, optimizer=optimizer, gathered=gathered,
        activations=kept * tokens, loss=loss_bytes(cfg, tokens, wl), alltoall_buffers=a2a,
        backward_workspace=(largest + 2 * cfg.d_model * wl.act_bytes) * tokens)
