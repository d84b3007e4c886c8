"""Qwen3-MoE: GQA with a per-head RMSNorm on q and k, softmax top-k (renormalised with
norm_topk_prob), no shared expert, MoE layers chosen as in Qwen2-MoE."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    DENSE_MLP, GQA, NORMS, TOP, HFConfig, check_gqa, check_moe_export, check_window, common_to_hf,
    experts_in_moe_layers, layer_pattern, moe_rules, read_common, refuse)
from moelab.interop.families.qwen2_moe import read_routing, read_sparse_layers, sparse_to_hf
from moelab.interop.keymap import KeyMap

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
KEYMAP = KeyMap(top=TOP, layer=NORMS + GQA + DENSE_MLP + moe_rules(), ignore=(r".*rotary_emb\.inv_freq",))


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c)
    check_window(c, m["max_seq_len"])
    c.expect("attention_bias", lambda v: not v, "its bias also covers the output projection, which moelab lacks", False)
    E = c.first("num_experts", "num_local_experts")
    k, norm = read_routing(c)
    m["qk_norm"] = "head"
    m["ffn_hidden"] = c.get("intermediate_size")
    m["moe"] = {**layer_pattern(m["n_layers"], read_sparse_layers(c, m["n_layers"], E)),
                "num_experts": E, "top_k": k, "expert_hidden": c.get("moe_intermediate_size"),
                "router": "softmax", "renormalize": norm,
                "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001))}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    check_gqa(m, MODEL_TYPE, qk_norm="head")
    moe = m.moe
    check_moe_export(m, MODEL_TYPE, notes)
    if moe.num_shared_experts:
        refuse(MODEL_TYPE, f"num_shared_experts = {moe.num_shared_experts}", "Qwen3-MoE has no shared experts")
    return {**common_to_hf(m, MODEL_TYPE), "head_dim": m.attn_head_dim, "attention_bias": False,
            "intermediate_size": m.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "num_experts": experts_in_moe_layers(m), "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize and moe.top_k > 1, "router_aux_loss_coef": moe.aux_loss_coef,
            "use_sliding_window": False, **sparse_to_hf(m)}
