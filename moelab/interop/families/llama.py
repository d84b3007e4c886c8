"""Llama (dense): GQA with plain RoPE, SwiGLU in every layer, no biases."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.interop.families.common import (
    DENSE_MLP, GQA, NORMS, TOP, HFConfig, check_gqa, common_to_hf, read_common, refuse)
from moelab.interop.keymap import KeyMap

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
KEYMAP = KeyMap(top=TOP, layer=NORMS + GQA + DENSE_MLP, ignore=(r".*rotary_emb\.inv_freq",))


def model_from_hf(c: HFConfig) -> dict:
    m = read_common(c)
    c.expect("attention_bias", lambda v: not v, "moelab has no bias on the output projection", False)
    c.expect("mlp_bias", lambda v: not v, "moelab's SwiGLU has no biases", False)
    m["ffn_hidden"] = c.get("intermediate_size")
    m["moe"] = {"layers": "none"}
    return m


def model_to_hf(m: ModelConfig, notes: list[str]) -> dict:
    check_gqa(m, MODEL_TYPE)
    if m.moe_layer_indices():
        refuse(MODEL_TYPE, f"{len(m.moe_layer_indices())} MoE layers", "Llama is dense; use mixtral, qwen2_moe, qwen3_moe, olmoe or deepseek_v3")
    return {**common_to_hf(m, MODEL_TYPE), "head_dim": m.attn_head_dim, "intermediate_size": m.ffn_hidden,
            "attention_bias": False, "mlp_bias": False}
