"""Which llama.cpp architecture computes what a moelab model computes, or why none does.

llama.cpp has no general "config": each architecture (``general.architecture`` in a GGUF file) is a
hand-written graph with its own fixed choices (RoPE layout, router function, whether the top-k
weights are renormalised, which tensors exist). So the exporter picks the one architecture whose
fixed choices equal the model's, reading each choice from the graph code of the llama.cpp that
llama-cpp-python vendors (``src/models/<arch>.cpp``):

- ``llama``: a dense model, or an MoE in every layer with softmax top-k renormalised over the k
  chosen (Mixtral); RoPE rotates adjacent pairs, so our half-rotated q/k rows are permuted;
- ``olmoe``: MoE in every layer, RMSNorm over the whole q and k projections (multi-head
  attention), softmax top-k *not* renormalised;
- ``qwen3moe``: MoE in every layer, per-head q/k RMSNorm, softmax top-k renormalised;
- ``qwen2moe``: MoE in every layer, one shared expert behind a sigmoid gate, softmax top-k not
  renormalised;
- ``deepseek2``: multi-head latent attention, leading dense layers then MoE, shared experts
  without a gate, softmax or sigmoid scores with an optional selection bias, group-limited routing
  scored by each group's top-2 sum, optional renormalisation and routed scaling.

Everything else is refused *before anything is written*, naming the config field and the reason.
The checks are allow-lists: a config field the exporter does not know, or a router kind it has not
mapped, is refused unless it has its default value, so a new moelab feature can never be exported
silently wrong. Interleaved dense/MoE layers are refused: llama.cpp's only architecture with an
MoE layer step (``llama4``) scales the expert *input* by a sigmoid router weight and L2-norms q/k,
and ``ernie4_5-moe`` loads expert tensors on every layer after its leading dense ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moelab.config import ModelConfig
from moelab.interop.errors import InteropError


class GGUFRefusal(InteropError):
    """The model cannot be written as a GGUF file llama.cpp runs identically; the message names
    the config field, its value and the reason. Raised before any file is opened."""


def refuse(field: str, value: Any, why: str) -> None:
    raise GGUFRefusal(f"cannot export to GGUF: {field} = {value!r}: {why}")


# ---------------------------------------------------------------------------------------------
# allow-lists
# ---------------------------------------------------------------------------------------------

# Router kinds llama.cpp can express. "noisy" adds learned noise in training only; at inference it
# is the plain softmax top-k. Any other kind (hash, expert_choice, sinkhorn, ...) is refused.
SOFTMAX_ROUTERS = ("softmax", "noisy")
SIGMOID_ROUTERS = ("sigmoid",)

# Fields the exporter reads (or knows to be training-only); any other field must keep its default.
MODEL_FIELDS = {
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
    "max_seq_len", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "attention",
    "attn_bias", "qk_norm", "causal", "mla", "moe",
    "init_std",                                            # training only
}
MOE_FIELDS = {
    "layers", "every", "first_dense", "num_experts", "num_experts_per_layer", "top_k",
    "expert_hidden", "router", "renormalize", "routed_scaling", "n_groups", "topk_groups",
    "group_score", "eval_capacity_factor", "num_shared_experts", "shared_expert_hidden",
    "shared_expert_gate",
    # training only: inference is dropless and these only shape losses or bias updates (the bias
    # values themselves are exported, or refused where the architecture has none)
    "capacity_factor", "drop_policy", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
    "balance_scope", "bias_update_rate",
}
MLA_FIELDS = {"kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}
ROPE_KINDS = ("default", "linear")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _unknown_fields(obj: Any, known: set[str], prefix: str) -> None:
    """Refuse any field outside ``known`` that does not hold its default value."""
    for f in dataclasses.fields(obj):
        if f.name in known:
            continue
        value = getattr(obj, f.name)
        if value != _default(f):
            refuse(f"{prefix}.{f.name}", value, "the GGUF exporter does not know this setting, so it "
                   "cannot promise llama.cpp computes the same; only settings it maps are exported")


# ---------------------------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The llama.cpp architecture and the model facts its metadata and tensors need."""

    arch: str                    # general.architecture
    rope_pairs: bool             # llama.cpp rotates adjacent pairs (permute our half-rotated rows)
    moe_layers: tuple[int, ...]
    leading_dense: int = 0       # deepseek2: dense layers before the first MoE layer
    experts: int = 0
    shared_experts: int = 0      # deepseek2: shared width / expert width
    gating: str = "softmax"      # "softmax" | "sigmoid"
    norm_topk: bool = False      # renormalise the k chosen weights
    uses_bias: bool = False      # the router's expert_bias shifts the selection


def _check_common(m: ModelConfig) -> None:
    _unknown_fields(m, MODEL_FIELDS, "model")
    _unknown_fields(m.moe, MOE_FIELDS, "model.moe")
    _unknown_fields(m.mla, MLA_FIELDS, "model.mla")
    if not m.causal:
        refuse("model.causal", m.causal, "an encoder (bidirectional attention); llama.cpp runs every "
               "architecture the exporter writes as a causal decoder, which would silently change it")
    if m.rope_scaling.kind not in ROPE_KINDS:
        refuse("model.rope_scaling.kind", m.rope_scaling.kind,
               f"the GGUF exporter maps RoPE scalings {', '.join(ROPE_KINDS)} only")


def _check_moe(m: ModelConfig, layers: list[int]) -> None:
    moe = m.moe
    if not isinstance(moe.expert_hidden, int):
        refuse("model.moe.expert_hidden", moe.expert_hidden, "heterogeneous experts: llama.cpp stacks "
               "the experts of a layer in one tensor, so they must all have one width")
    if moe.router not in SOFTMAX_ROUTERS + SIGMOID_ROUTERS:
        refuse("model.moe.router", moe.router, "llama.cpp routes by softmax top-k (or sigmoid top-k "
               f"with a selection bias); allowed: {', '.join(SOFTMAX_ROUTERS + SIGMOID_ROUTERS)}")
    counts = {m.experts_in_layer(i) for i in layers}
    if len(counts) > 1:
        refuse("model.moe.num_experts_per_layer", list(moe.num_experts_per_layer or ()),
               "llama.cpp has one expert count for every MoE layer")
    if moe.eval_capacity_factor is not None:
        refuse("model.moe.eval_capacity_factor", moe.eval_capacity_factor,
               "capacity dropping at inference; llama.cpp's MoE layers are dropless")
    if moe.n_groups > 1 and moe.group_score != "top2":
        refuse("model.moe.group_score", moe.group_score, "llama.cpp scores an expert group by the sum "
               "of its top-2 experts (DeepSeek-V3); set n_groups = 1 or group_score = 'top2'")


def _norm_topk(m: ModelConfig) -> bool:
    """Whether the k chosen weights are renormalised (moelab keeps the top-1 probability as is)."""
    return m.moe.renormalize and m.moe.top_k > 1


def _require_norm(m: ModelConfig, arch: str, wanted: bool) -> None:
    if _norm_topk(m) != wanted:
        how = "renormalises the k chosen weights (top_k > 1, renormalize = true)" if wanted else \
            "keeps the softmax probabilities of the chosen experts (renormalize = false or top_k = 1)"
        refuse("model.moe.renormalize", m.moe.renormalize, f"llama.cpp's {arch} {how}; "
               f"this model has top_k = {m.moe.top_k}")


def _require_heads_span_width(m: ModelConfig, arch: str) -> None:
    if m.n_heads * m.attn_head_dim != m.d_model:
        refuse("model.head_dim", m.attn_head_dim, f"llama.cpp's {arch} needs n_heads x head_dim = "
               f"d_model ({m.n_heads} x {m.attn_head_dim} != {m.d_model})")


def choose(m: ModelConfig) -> Choice:
    """The llama.cpp architecture for ``m``, or a GGUFRefusal naming the field and the reason."""
    _check_common(m)
    layers = m.moe_layer_indices()
    if layers:
        _check_moe(m, layers)
    if m.attention == "mla":
        return _deepseek2(m, layers)
    if m.attention != "gqa":
        refuse("model.attention", m.attention, "not mapped to a llama.cpp architecture")
    if not layers:
        if m.qk_norm != "none":
            refuse("model.qk_norm", m.qk_norm, "the dense llama architecture has no q/k norms")
        return Choice("llama", rope_pairs=True, moe_layers=())
    if layers != list(range(m.n_layers)):
        refuse("model.moe.layers", layers, "llama.cpp architectures with grouped-query attention put "
               "MoE in every layer (deepseek2's leading dense layers need MLA attention); llama4's MoE "
               "layer step scales the expert input by its router weight and L2-norms q/k, so it "
               "cannot run interleaved moelab layers")
    moe = m.moe
    if moe.router in SIGMOID_ROUTERS:
        refuse("model.moe.router", moe.router, "deepseek2 is llama.cpp's only architecture with sigmoid "
               "routing and it needs model.attention = 'mla'")
    if moe.routed_scaling != 1.0:
        refuse("model.moe.routed_scaling", moe.routed_scaling, "only llama.cpp's deepseek2 scales the "
               "routed weights; its other MoE architectures read no scale")
    experts = m.experts_in_layer(layers[0])
    shared = moe.num_shared_experts > 0
    if shared and not moe.shared_expert_gate:
        refuse("model.moe.shared_expert_gate", False, "an ungated shared expert with grouped-query "
               "attention has no llama.cpp architecture here (qwen2moe's shared expert has a sigmoid "
               "gate; deepseek2 needs MLA)")
    if shared:
        if m.qk_norm != "none":
            refuse("model.qk_norm", m.qk_norm, "llama.cpp's qwen2moe has no q/k norms")
        _require_heads_span_width(m, "qwen2moe")
        _require_norm(m, "qwen2moe", False)
        return Choice("qwen2moe", rope_pairs=False, moe_layers=tuple(layers), experts=experts)
    if m.qk_norm == "full":
        if m.kv_heads != m.n_heads:
            refuse("model.n_kv_heads", m.kv_heads, "llama.cpp's olmoe norms k over d_model, so it needs "
                   f"multi-head attention (n_kv_heads = n_heads = {m.n_heads})")
        _require_heads_span_width(m, "olmoe")
        _require_norm(m, "olmoe", False)
        return Choice("olmoe", rope_pairs=False, moe_layers=tuple(layers), experts=experts)
    if m.qk_norm == "head":
        _require_norm(m, "qwen3moe", True)
        return Choice("qwen3moe", rope_pairs=False, moe_layers=tuple(layers), experts=experts, norm_topk=True)
    _require_norm(m, "llama", True)
    return Choice("llama", rope_pairs=True, moe_layers=tuple(layers), experts=experts, norm_topk=True)


def _deepseek2(m: ModelConfig, layers: list[int]) -> Choice:
    moe = m.moe
    if m.qk_norm != "none":
        refuse("model.qk_norm", m.qk_norm, "MLA has its own latent norms; deepseek2 has no q/k norms")
    if m.attn_bias:
        refuse("model.attn_bias", True, "deepseek2's MLA projections have no biases")
    if m.rope_scaling.kind != "default":
        refuse("model.rope_scaling.kind", m.rope_scaling.kind, "deepseek2 ties its RoPE scaling to a YaRN "
               "attention factor the exporter does not map")
    first = layers[0] if layers else m.n_layers
    if layers != list(range(first, m.n_layers)):
        refuse("model.moe.layers", layers, "deepseek2 has leading dense layers, then MoE in every layer")
    if not layers:
        return Choice("deepseek2", rope_pairs=True, moe_layers=(), leading_dense=m.n_layers)
    width = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
    if moe.shared_expert_gate or width == 0 or width % moe.expert_hidden:
        refuse("model.moe.num_shared_experts", moe.num_shared_experts,
               f"deepseek2's MoE layers have ungated shared experts whose width is a multiple of the "
               f"expert width ({moe.expert_hidden}); this model has {moe.num_shared_experts} x "
               f"{moe.shared_expert_hidden or moe.expert_hidden}"
               f"{' behind a gate' if moe.shared_expert_gate else ''}")
    gating = "sigmoid" if moe.router in SIGMOID_ROUTERS else "softmax"
    uses_bias = gating == "sigmoid" or moe.bias_update_rate > 0
    return Choice("deepseek2", rope_pairs=True, moe_layers=tuple(layers), leading_dense=first,
                  experts=m.experts_in_layer(first), shared_experts=width // moe.expert_hidden,
                  gating=gating, norm_topk=_norm_topk(m), uses_bias=uses_bias)

