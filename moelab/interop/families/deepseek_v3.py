"""DeepSeek-V3: Multi-head Latent Attention (optional low-rank q), sigmoid expert affinities with a
selection-only bias (e_score_correction_bias: our router.expert_bias), group-limited routing scored
by each group's top-2 sum, routed_scaling_factor, shared experts without a gate, and the first
``first_k_dense_replace`` layers dense.

RoPE: with ``rope_interleave`` (the default, and what the released checkpoints assume) HF rotates
adjacent pairs; we rotate halves, so the RoPE rows of q and of the shared RoPE key are permuted on
the way in and back on the way out (see :class:`moelab.interop.keymap.RopeRows`). Export always
writes ``rope_interleave: true`` so that an imported checkpoint round-trips bit-exactly.

The latent norms (q_a_layernorm, kv_a_layernorm) use transformers' fixed eps 1e-6 whatever
``rms_norm_eps`` says, while ours use ``norm_eps``; the two must therefore be 1e-6.
Multi-token-prediction layers (``num_nextn_predict_layers``, stored as layers past
``num_hidden_layers``) are not part of the model transformers runs and are skipped with a note.
"""

from __future__ import annotations

import torch

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    DENSE_MLP, NORMS, TOP, HFConfig, check_moe_export, common_to_hf, experts_in_moe_layers, moe_rules,
    read_common, refuse, shared_rules)
from moelab.interop.families.qwen2_moe import read_routing
from moelab.interop.keymap import Ctx, KeyMap, RopeRows, Rule

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
LATENT_NORM_EPS = 1e-6
EXTRA_LAYERS_ARE_MTP = True


def _q_rope_rows(ctx: Ctx) -> torch.Tensor:
    """Rows of the q projection holding RoPE dims: per head, the last Dr of (nope + Dr)."""
    a = ctx.cfg.mla
    per_head = a.qk_nope_head_dim + a.qk_rope_head_dim
    heads = torch.arange(ctx.cfg.n_heads).unsqueeze(1) * per_head                     # (H, 1)
    return (heads + a.qk_nope_head_dim + torch.arange(a.qk_rope_head_dim)).flatten()  # (H * Dr,)


def _kv_rope_rows(ctx: Ctx) -> torch.Tensor:
    """Rows of kv_down (c_kv | k_rope) holding the shared RoPE key: the last Dr after R."""
    a = ctx.cfg.mla
    return a.kv_lora_rank + torch.arange(a.qk_rope_head_dim)


MLA = (
    Rule("attn.q_proj.weight", ("self_attn.q_proj.weight",), RopeRows(_q_rope_rows)),     # H(nope+Dr) x D
    Rule("attn.q_down.weight", ("self_attn.q_a_proj.weight",)),                           # Rq x D
    Rule("attn.q_norm.weight", ("self_attn.q_a_layernorm.weight",)),
    Rule("attn.q_up.weight", ("self_attn.q_b_proj.weight",), RopeRows(_q_rope_rows)),      # H(nope+Dr) x Rq
    Rule("attn.kv_down.weight", ("self_attn.kv_a_proj_with_mqa.weight",), RopeRows(_kv_rope_rows)),  # (R+Dr) x D
    Rule("attn.kv_norm.weight", ("self_attn.kv_a_layernorm.weight",)),
    Rule("attn.kv_up.weight", ("self_attn.kv_b_proj.weight",)),                          # H(nope+Dv) x R
    Rule("attn.out.weight", ("self_attn.o_proj.weight",)),
)

KEYMAP = KeyMap(top=TOP, layer=NORMS + MLA + DENSE_MLP + moe_rules(bias="e_score_correction_bias")
                + shared_rules("shared_experts"), ignore=(r".*rotary_emb\.inv_freq",))


def rope_interleave(c: HFConfig) -> bool:
    return bool(c.get("rope_interleave", True))


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c)
    m.pop("head_dim", None)          # transformers stores qk_rope_head_dim there; MLA has its own sizes
    m["n_kv_heads"] = None           # every MLA head has its own keys and values
    c.get("qk_head_dim", None)       # derived: nope + rope
    c.get("num_nextn_predict_layers", None)
    if m["norm_eps"] != LATENT_NORM_EPS:
        c.fail("rms_norm_eps", m["norm_eps"], f"transformers' latent norms always use eps {LATENT_NORM_EPS} and "
               "moelab uses one eps for all norms")
    c.expect("attention_bias", lambda v: not v, "moelab's MLA projections have no biases", False)
    c.expect("topk_method", lambda v: v == "noaux_tc", "transformers' DeepSeek-V3 routes with noaux_tc only", "noaux_tc")
    c.expect("scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 scores experts with a sigmoid", "sigmoid")
    c.expect("moe_layer_freq", lambda v: v == 1, "every layer after first_k_dense_replace is MoE", 1)
    quant = c.get("quantization_config", None)
    if quant:
        c.fail("quantization_config", quant.get("quant_method", quant), "quantized checkpoints are not supported; "
               "convert to bf16/fp32 first")
    k, norm = read_routing(c)
    n_shared = c.expect("n_shared_experts", lambda v: v is not None and v >= 1,
                        "transformers' DeepSeek-V3 always builds a shared expert", 1)
    E = c.first("n_routed_experts", "num_local_experts")
    groups = c.get("n_group", None) or 1
    m["attention"] = "mla"
    m["mla"] = {"kv_lora_rank": c.get("kv_lora_rank"), "q_lora_rank": c.get("q_lora_rank", None),
                "qk_nope_head_dim": c.get("qk_nope_head_dim"), "qk_rope_head_dim": c.get("qk_rope_head_dim"),
                "v_head_dim": c.get("v_head_dim")}
    m["ffn_hidden"] = c.get("intermediate_size")
    m["moe"] = {"layers": "all", "first_dense": min(c.get("first_k_dense_replace", 0) or 0, m["n_layers"]),
                "num_experts": E, "top_k": k, "expert_hidden": c.get("moe_intermediate_size"),
                "router": "sigmoid", "renormalize": norm, "routed_scaling": float(c.get("routed_scaling_factor", 1.0)),
                "n_groups": groups, "topk_groups": c.get("topk_group", None) or 1, "group_score": "top2",
                "num_shared_experts": n_shared, "aux_loss_coef": 0.0}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    moe = m.moe
    if m.attention != "mla":
        refuse(MODEL_TYPE, f"attention = {m.attention!r}", "DeepSeek-V3 uses multi-head latent attention")
    if m.norm_eps != LATENT_NORM_EPS:
        refuse(MODEL_TYPE, f"norm_eps = {m.norm_eps}", f"transformers fixes the latent norms' eps at {LATENT_NORM_EPS}, "
               "so only a model trained with norm_eps = 1e-6 maps exactly")
    layers = m.moe_layer_indices()
    first = layers[0] if layers else m.n_layers
    if layers != list(range(first, m.n_layers)):
        refuse(MODEL_TYPE, f"MoE layers {layers}", "DeepSeek-V3 has dense layers first, then MoE in every layer")
    check_moe_export(m, MODEL_TYPE, notes, router="sigmoid")
    if moe.n_groups > 1 and moe.group_score != "top2":
        refuse(MODEL_TYPE, f"moe.group_score = {moe.group_score!r}", "DeepSeek-V3 scores a group by its top-2 sum")
    width = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
    if layers and (width == 0 or width % moe.expert_hidden or moe.shared_expert_gate):
        refuse(MODEL_TYPE, f"shared experts {moe.num_shared_experts} x {moe.shared_expert_hidden or moe.expert_hidden}"
               f"{' with a gate' if moe.shared_expert_gate else ''}",
               "DeepSeek-V3's ungated shared expert is n_shared_experts x moe_intermediate_size wide")
    a = m.mla
    out = {**common_to_hf(m, MODEL_TYPE), "num_key_value_heads": m.n_heads,
           "intermediate_size": m.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
           "n_routed_experts": experts_in_moe_layers(m), "num_experts_per_tok": moe.top_k,
           "n_shared_experts": max(1, width // moe.expert_hidden),
           "routed_scaling_factor": moe.routed_scaling, "norm_topk_prob": moe.renormalize and moe.top_k > 1,
           "n_group": moe.n_groups, "topk_group": moe.topk_groups, "first_k_dense_replace": first,
           "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
           "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
           "rope_interleave": True, "attention_bias": False, "num_nextn_predict_layers": 0}
    if moe.aux_loss_coef > 0:
        notes.append(f"moe.aux_loss_coef = {moe.aux_loss_coef} is training-only and is dropped")
    return out
