"""Qwen2-MoE (Qwen1.5-MoE): GQA with q/k/v biases, softmax top-k (renormalised only with
norm_topk_prob), one shared expert scaled by a sigmoid gate, MoE on layers chosen by
decoder_sparse_step and mlp_only_layers (dense SwiGLU elsewhere)."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    DENSE_MLP, GQA, NORMS, TOP, HFConfig, check_gqa, check_moe_export, check_window, common_to_hf,
    experts_in_moe_layers, layer_pattern, moe_rules, read_common, refuse, shared_rules)
from moelab.interop.keymap import KeyMap

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
KEYMAP = KeyMap(top=TOP, layer=NORMS + GQA + DENSE_MLP + moe_rules() + shared_rules("shared_expert", "shared_expert_gate"),
                ignore=(r".*rotary_emb\.inv_freq",))


def read_sparse_layers(c: HFConfig, n_layers: int, num_experts: int) -> list[int]:
    """HF's rule: layer i is MoE unless listed in mlp_only_layers, when (i + 1) % step == 0."""
    step = c.expect("decoder_sparse_step", lambda v: isinstance(v, int) and v >= 1, "must be >= 1", 1)
    only = set(c.get("mlp_only_layers", None) or [])
    return [i for i in range(n_layers) if i not in only and num_experts > 0 and (i + 1) % step == 0]


def read_routing(c: HFConfig) -> tuple[int, bool]:
    k = c.get("num_experts_per_tok")
    norm = bool(c.get("norm_topk_prob", False))
    if norm and k == 1:
        c.fail("norm_topk_prob", norm, "with num_experts_per_tok = 1 it sets every weight to 1; "
               "moelab keeps the softmax probability")
    return k, norm


def sparse_to_hf(m: ModelConfig) -> dict:
    moe = set(m.moe_layer_indices())
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(m.n_layers) if i not in moe]}


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c)
    check_window(c, m["max_seq_len"])
    m["attn_bias"] = bool(c.get("qkv_bias", True))
    E = c.first("num_experts", "num_local_experts")
    k, norm = read_routing(c)
    shared = c.expect("shared_expert_intermediate_size", lambda v: v > 0,
                      "Qwen2-MoE's shared expert needs a positive width")
    m["ffn_hidden"] = c.get("intermediate_size")
    m["moe"] = {**layer_pattern(m["n_layers"], read_sparse_layers(c, m["n_layers"], E)),
                "num_experts": E, "top_k": k, "expert_hidden": c.get("moe_intermediate_size"),
                "router": "softmax", "renormalize": norm,
                "num_shared_experts": 1, "shared_expert_hidden": shared, "shared_expert_gate": True,
                "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001))}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    check_gqa(m, MODEL_TYPE, bias=True)
    moe = m.moe
    check_moe_export(m, MODEL_TYPE, notes)
    if m.moe_layer_indices() and (moe.num_shared_experts == 0 or not moe.shared_expert_gate):
        refuse(MODEL_TYPE, f"num_shared_experts = {moe.num_shared_experts}, shared_expert_gate = "
               f"{moe.shared_expert_gate}", "every Qwen2-MoE layer has one gated shared expert")
    return {**common_to_hf(m, MODEL_TYPE), "head_dim": m.attn_head_dim, "qkv_bias": m.attn_bias,
            "intermediate_size": m.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "shared_expert_intermediate_size": moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden),
            "num_experts": experts_in_moe_layers(m), "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize and moe.top_k > 1, "router_aux_loss_coef": moe.aux_loss_coef,
            "use_sliding_window": False, **sparse_to_hf(m)}
