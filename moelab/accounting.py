"""Analytic parameter, FLOP and memory accounting from a config alone (no model is built).

Total parameters count every weight; active parameters count what one token uses: all routed
experts but its top-k are left out. Forward FLOPs per token follow Kaplan et al. (2020): 2 per
multiply-accumulate of every active matmul weight (embedding lookups cost nothing), plus attention
scores and the weighted sum of values at a given sequence length, averaged over causal positions
(an encoder's every position attends all of them).

Where a token's routed parameters are not fixed by the config, the active count is an expectation
and :func:`active_basis` says which: heterogeneous experts (a list ``expert_hidden``) count the
mean expert under uniform routing; the ReLU router counts its target of ``top_k`` experts, expert
choice its ``capacity_factor * top_k`` experts per token on average. :func:`measured_active` replaces
that expectation by the routing measured on held-out tokens (``moelab inspect`` reports it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.config import ModelConfig


@dataclass(frozen=True)
class LayerCount:
    layer: int
    ffn: str            # "dense" or "moe"
    experts: int
    total: int
    active: int


def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention sublayer (projections, biases, q/k or latent norms)."""
    D, H = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        a = cfg.mla
        q_dim = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        q = D * q_dim if a.q_lora_rank is None else D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * q_dim
        kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
            + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + H * a.v_head_dim * D
    G, Dh = cfg.kv_heads, cfg.attn_head_dim
    qkv = D * (H + 2 * G) * Dh + ((H + 2 * G) * Dh if cfg.attn_bias else 0)
    norms = {"none": 0, "head": 2 * Dh, "full": (H + G) * Dh}[cfg.qk_norm]
    return qkv + H * Dh * D + norms


@dataclass(frozen=True)
class FFNParams:
    """One layer's FFN parameters by kind: what is sharded where under expert parallelism
    (routed experts split over EP ranks, the rest replicated on them) and what a token uses."""

    dense: int = 0          # dense SwiGLU (a dense layer)
    router: int = 0         # gate (+ learned noise weight, + group gate); 0 for hash routing
    router_active: int = 0  # what a token uses of it: the noise weight only acts in training
    experts: int = 0        # number of routed experts
    per_expert: int = 0     # one routed expert (heterogeneous: the mean one, rounded)
    top_k: int = 0
    shared: int = 0         # shared experts (+ their sigmoid gate)
    expert_sizes: tuple[int, ...] = ()   # heterogeneous experts: each routed expert's parameters
    experts_per_token: float = 0.0       # expected routed experts per token (top_k unless variable)

    @property
    def routed(self) -> int:
        return sum(self.expert_sizes) if self.expert_sizes else self.experts * self.per_expert

    @property
    def total(self) -> int:
        return self.dense + self.router + self.routed + self.shared

    @property
    def routed_active(self) -> int:
        """Routed parameters one token uses: exact for fixed top-k and one width, else the
        expectation :func:`active_basis` names."""
        if self.expert_sizes:
            return round(self.experts_per_token * self.routed / self.experts)
        if self.experts_per_token == self.top_k:
            return self.top_k * self.per_expert
        return round(self.experts_per_token * self.per_expert)

    @property
    def active(self) -> int:
        return self.dense + self.router_active + self.routed_active + self.shared


def ffn_params(cfg: ModelConfig, layer: int) -> FFNParams:
    D = cfg.d_model
    E = cfg.experts_in_layer(layer)
    if E == 0:
        return FFNParams(dense=3 * D * cfg.ffn_hidden)
    m = cfg.moe
    shared = 0
    if m.num_shared_experts:
        shared = 3 * D * m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)
        shared += D if m.shared_expert_gate else 0
    gate = 0 if m.router == "hash" else E * D
    groups = m.n_groups * D if m.group_router == "learned" else 0
    sizes = tuple(3 * D * h for h in m.expert_widths(E)) if m.heterogeneous else ()
    return FFNParams(router=gate * (2 if m.router == "noisy" else 1) + groups, router_active=gate + groups,
                     experts=E, per_expert=round(sum(sizes) / E) if sizes else 3 * D * m.expert_hidden,
                     top_k=m.top_k, shared=shared, expert_sizes=sizes,
                     experts_per_token=experts_per_token(cfg, E))


def experts_per_token(cfg: ModelConfig, num_experts: int) -> float:
    """Routed experts a token uses on average: top_k, except expert choice (each of E experts
    takes capacity_factor * N * K / E of N tokens: capacity_factor * K per token, at most E)."""
    m = cfg.moe
    if m.router == "expert_choice":
        return min(float(num_experts), (m.capacity_factor or 1.0) * m.top_k)
    return float(m.top_k)


def active_basis(cfg: ModelConfig) -> str:
    """What the active count and FLOPs per token of ``cfg`` assume about routing."""
    m = cfg.moe
    if not cfg.moe_layer_indices():
        return "exact (dense)"
    parts = []
    if m.router == "relu":
        parts.append(f"expectation at the ReLU router's target of top_k = {m.top_k} experts per token")
    elif m.router == "expert_choice":
        parts.append(f"expectation: expert choice gives tokens {experts_per_token(cfg, m.num_experts):g} "
                     "experts on average (capacity_factor x top_k)")
    if m.heterogeneous:
        parts.append("expectation under uniform routing over experts of different widths (the mean "
                     "expert); `moelab inspect` measures it under the trained routing on held-out tokens")
    return "; ".join(parts) if parts else "exact (top-k routing, one expert width)"


def measured_active(cfg: ModelConfig, assignments: dict[int, list[float]], tokens: int,
                    seq_len: int | None = None) -> dict:
    """Active parameters and forward FLOPs per token with each MoE layer's routed parameters taken
    from measured routing: ``assignments[layer][e]`` = assignments expert e ran over ``tokens``
    tokens. Labelled with its basis."""
    base = param_counts(cfg)
    delta = 0.0
    for layer, counts in assignments.items():
        f = ffn_params(cfg, layer)
        sizes = f.expert_sizes or (f.per_expert,) * f.experts
        measured = sum(c * s for c, s in zip(counts, sizes)) / max(tokens, 1)
        delta += measured - f.routed_active
    flops = flops_per_token(cfg, seq_len)
    return {"active_params": round(base["active"] + delta),
            "flops_per_token": round(flops["total"] + 2 * delta),
            "basis": f"expectation under the routing measured on {tokens:,} held-out tokens"}


def _ffn_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of one layer's FFN."""
    f = ffn_params(cfg, layer)
    return f.total, f.active


def layer_counts(cfg: ModelConfig) -> list[LayerCount]:
    attn = attention_params(cfg) + 2 * cfg.d_model     # + the block's two norms
    out = []
    for i in range(cfg.n_layers):
        total, active = _ffn_params(cfg, i)
        E = cfg.experts_in_layer(i)
        out.append(LayerCount(i, "moe" if E else "dense", E, attn + total, attn + active))
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "active", "embedding", "head"}; equals summing the built model's parameters.
    ``head`` is 0 when the LM head is tied to the embedding."""
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    layers = layer_counts(cfg)
    outside = embedding + head + cfg.d_model           # + final norm
    return {
        "total": outside + sum(c.total for c in layers),
        "active": outside + sum(c.active for c in layers),
        "embedding": embedding,
        "head": head,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token at ``seq_len`` (default: max_seq_len): matmuls + attention."""
    T = seq_len or cfg.max_seq_len
    D, V = cfg.d_model, cfg.vocab_size
    matmul = 0
    for i, c in enumerate(layer_counts(cfg)):
        norms = 2 * D + _norm_params_in_attention(cfg)
        matmul += c.active - norms
    matmul += V * D                                    # LM head (tied or not)
    if cfg.attention == "mla":
        d_qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
        d_v = cfg.mla.v_head_dim
    else:
        d_qk = d_v = cfg.attn_head_dim
    # causal: position t sees t + 1 keys; an encoder's positions see all T
    mean_keys = (T + 1) / 2 if cfg.causal else T
    attention = int(2 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * mean_keys)
    return {"matmul": 2 * matmul, "attention": attention, "total": 2 * matmul + attention}


def _norm_params_in_attention(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        a = cfg.mla
        return a.kv_lora_rank + (a.q_lora_rank or 0)
    Dh, H, G = cfg.attn_head_dim, cfg.n_heads, cfg.kv_heads
    bias = (H + 2 * G) * Dh if cfg.attn_bias else 0
    return bias + {"none": 0, "head": 2 * Dh, "full": (H + G) * Dh}[cfg.qk_norm]


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, bytes_per_elem: int = 4) -> int:
    """Estimate of what autograd keeps for backward in one training step.

    Per token and layer: the block input and two norm outputs (3D); q, k, v, attention output and
    its projection input; for a dense FFN the fused gate/up output and the gated product (3F);
    for an MoE the dispatched rows and their expert intermediates (K * (D + 3H)) plus router
    logits/probs; then logits and their softmax for the loss (2V). An estimate, not a bound:
    kernels may keep less (fused attention) or more (temporaries).
    """
    D, V = cfg.d_model, cfg.vocab_size
    if cfg.attention == "mla":
        a = cfg.mla
        H = cfg.n_heads
        attn = (H * (a.qk_nope_head_dim + a.qk_rope_head_dim) * 2 + a.kv_lora_rank * 2
                + H * (a.qk_nope_head_dim + a.v_head_dim) + 2 * H * a.v_head_dim)
    else:
        H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        attn = (H + 2 * G) * Dh + 2 * H * Dh
    per_token = 0
    for i in range(cfg.n_layers):
        E = cfg.experts_in_layer(i)
        if E:
            m = cfg.moe
            ffn = round(experts_per_token(cfg, E) * (D + 3 * m.mean_expert_hidden)) + 3 * E
            if m.num_shared_experts:
                ffn += 3 * m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)
        else:
            ffn = 3 * cfg.ffn_hidden
        per_token += 3 * D + attn + ffn
    per_token += 2 * V + D
    return per_token * batch * seq_len * bytes_per_elem


def memory_estimate(cfg: ModelConfig, batch: int = 8, seq_len: int | None = None,
                    weight_bytes: int = 4) -> dict[str, int]:
    """Bytes for weights, gradients, AdamW states (two fp32 moments) and activations."""
    T = seq_len or cfg.max_seq_len
    P = param_counts(cfg)["total"]
    out = {
        "weights": P * weight_bytes,
        "gradients": P * weight_bytes,
        "adamw_states": P * 8,
        "activations": activation_bytes(cfg, batch, T, weight_bytes),
    }
    out["total"] = sum(out.values())
    return out


def describe(cfg: ModelConfig, batch: int = 8, seq_len: int | None = None) -> dict:
    """Everything ``moelab info`` prints, as one JSON-ready dict."""
    from moelab.model.attention import cache_bytes_per_token
    counts = param_counts(cfg)
    flops = flops_per_token(cfg, seq_len)
    return {
        "total_params": counts["total"],
        "active_params": counts["active"],
        "active_basis": active_basis(cfg),
        "embedding_params": counts["embedding"],
        "flops_per_token": flops["total"],
        "flops": flops,
        "memory_bytes": memory_estimate(cfg, batch, seq_len),
        "kv_cache_bytes_per_token": cache_bytes_per_token(cfg, 2),
        "attention": cfg.attention,
        "layers": [asdict(c) for c in layer_counts(cfg)],
    }


def inference_bytes(cfg: ModelConfig, weight_bytes: float = 4, batch: int = 1, seq_len: int | None = None,
                    cache_positions: int = 0) -> int:
    """The least a forward pass without gradients holds: every weight in its dtype, the fp32
    logits of ``batch`` x ``seq_len`` positions and a KV cache (bf16) of ``cache_positions``
    per sequence. A floor, not an estimate of the peak: commands refuse what cannot fit even so."""
    from moelab.model.attention import cache_bytes_per_token
    T = seq_len or 1
    weights = int(param_counts(cfg)["total"] * weight_bytes)
    logits = batch * T * cfg.vocab_size * 4
    cache = batch * cache_positions * cache_bytes_per_token(cfg, 2) if cfg.causal else 0
    return weights + logits + cache


def training_bytes_per_process(cfg: ModelConfig, batch: int, seq_len: int, world_size: int = 1,
                                activation_checkpointing: bool = False) -> int:
    """What one of ``world_size`` training processes holds at least: the model is built on the
    meta device and sharded before any weight exists (``trainer._build_model``), so each process
    holds its share of weights, gradients, AdamW states and the activations of its rows of the
    global ``batch`` (left out with activation checkpointing, which keeps far fewer)."""
    mem = memory_estimate(cfg, batch, seq_len)
    total = mem["total"] - (mem["activations"] if activation_checkpointing else 0)
    return total // max(1, world_size)
