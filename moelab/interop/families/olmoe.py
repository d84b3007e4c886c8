"""OLMoE: GQA with RMSNorm over the whole q and k projections, an MoE in every layer, softmax
top-k (renormalised with norm_topk_prob), no shared expert."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    GQA, NORMS, TOP, HFConfig, check_gqa, check_moe_export, common_to_hf, experts_in_moe_layers,
    moe_rules, read_common, refuse)
from moelab.interop.families.qwen2_moe import read_routing
from moelab.interop.keymap import KeyMap

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
KEYMAP = KeyMap(top=TOP, layer=NORMS + GQA + moe_rules(), ignore=(r".*rotary_emb\.inv_freq",))


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c)
    if "head_dim" in m:
        c.fail("head_dim", m["head_dim"], "OLMoE's q/k norms assume hidden_size / num_attention_heads")
    c.expect("attention_bias", lambda v: not v, "its bias also covers the output projection, which moelab lacks", False)
    c.expect("clip_qkv", lambda v: v is None, "clamping q/k/v is not implemented", None)
    k, norm = read_routing(c)
    hidden = c.get("intermediate_size")
    m["qk_norm"] = "full"
    m["ffn_hidden"] = hidden
    m["moe"] = {"layers": "all", "num_experts": c.first("num_experts", "num_local_experts"), "top_k": k, "expert_hidden": hidden,
                "router": "softmax", "renormalize": norm,
                "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.01))}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    check_gqa(m, MODEL_TYPE, qk_norm="full")
    moe = m.moe
    if m.attn_head_dim * m.n_heads != m.d_model:
        refuse(MODEL_TYPE, f"head_dim = {m.attn_head_dim}", "OLMoE's head dim is d_model / n_heads")
    if len(m.moe_layer_indices()) != m.n_layers:
        refuse(MODEL_TYPE, f"MoE layers {m.moe_layer_indices()}", "every OLMoE layer is MoE")
    check_moe_export(m, MODEL_TYPE, notes)
    if moe.num_shared_experts:
        refuse(MODEL_TYPE, f"num_shared_experts = {moe.num_shared_experts}", "OLMoE has no shared experts")
    return {**common_to_hf(m, MODEL_TYPE), "intermediate_size": moe.expert_hidden, "attention_bias": False,
            "clip_qkv": None, "num_experts": experts_in_moe_layers(m), "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize and moe.top_k > 1, "router_aux_loss_coef": moe.aux_loss_coef}
