"""Mixtral: GQA, an MoE in every layer, softmax top-k with the chosen weights renormalised,
no shared expert. Checkpoints name the MoE ``block_sparse_moe`` with experts w1 (gate), w3 (up),
w2 (down)."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    GQA, NORMS, TOP, HFConfig, check_gqa, check_moe_export, check_window, common_to_hf,
    experts_in_moe_layers, moe_rules, read_common, refuse)
from moelab.interop.keymap import KeyMap

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
KEYMAP = KeyMap(top=TOP, layer=NORMS + GQA + moe_rules(prefix="block_sparse_moe", gate="w1", up="w3", down="w2"),
                ignore=(r".*rotary_emb\.inv_freq",))


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c, default_theta=1e6)
    check_window(c, m["max_seq_len"])
    k = c.get("num_experts_per_tok", 2)
    if k == 1:
        c.fail("num_experts_per_tok", k, "Mixtral renormalises the top-1 weight to exactly 1, "
               "moelab keeps the softmax probability")
    hidden = c.get("intermediate_size")
    m["ffn_hidden"] = hidden
    m["moe"] = {"layers": "all", "num_experts": c.first("num_local_experts", "num_experts"), "top_k": k,
                "expert_hidden": hidden, "router": "softmax", "renormalize": True,
                "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001))}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    check_gqa(m, MODEL_TYPE)
    moe = m.moe
    if len(m.moe_layer_indices()) != m.n_layers:
        refuse(MODEL_TYPE, f"MoE layers {m.moe_layer_indices()}", "every Mixtral layer is MoE")
    check_moe_export(m, MODEL_TYPE, notes)
    if not moe.renormalize or moe.top_k == 1:
        refuse(MODEL_TYPE, f"renormalize = {moe.renormalize}, top_k = {moe.top_k}",
               "Mixtral always renormalises the top-k weights (to 1 for top-1)")
    if moe.num_shared_experts:
        refuse(MODEL_TYPE, f"num_shared_experts = {moe.num_shared_experts}", "Mixtral has no shared experts")
    return {**common_to_hf(m, MODEL_TYPE), "head_dim": m.attn_head_dim,
            "intermediate_size": moe.expert_hidden, "num_local_experts": experts_in_moe_layers(m),
            "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
            "router_jitter_noise": 0.0, "sliding_window": None}
