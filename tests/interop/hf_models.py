"""Tiny random Hugging Face models of every supported family, built locally from each family's
config class (no download), plus helpers to run them beside ours."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)

# family -> list of (case id, config kwargs); each case exercises a different mapping
CASES = {
    "llama": [
        ("gqa", dict(num_key_value_heads=2, intermediate_size=80, rope_theta=5e5)),
        ("tied-headdim", dict(num_key_value_heads=4, intermediate_size=48, head_dim=8, tie_word_embeddings=True)),
        ("llama3-rope", dict(num_key_value_heads=2, intermediate_size=48, rope_parameters=dict(
            rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
        ("linear-rope", dict(num_key_value_heads=2, intermediate_size=48, rope_parameters=dict(
            rope_type="linear", rope_theta=1e4, factor=4.0))),
    ],
    "mixtral": [
        ("top2", dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
        ("yarn", dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                      head_dim=16, max_position_embeddings=8192,
                      rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                           original_max_position_embeddings=2048))),
    ],
    "qwen2_moe": [
        ("sparse-step-mlp-only", dict(num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
        ("step2-norm", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24,
                            shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=4)),
    ],
    "qwen3_moe": [
        ("norm", dict(num_key_value_heads=2, head_dim=24, intermediate_size=48, moe_intermediate_size=24,
                      num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0])),
        ("no-norm", dict(num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=24,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    ],
    "olmoe": [
        ("top2", dict(num_key_value_heads=4, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      norm_topk_prob=False)),
        ("gqa-norm", dict(num_key_value_heads=2, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                          norm_topk_prob=True)),
    ],
    "deepseek_v3": [
        ("q-lora-groups", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                               n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                               first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                               q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                               v_head_dim=12, norm_topk_prob=True)),
        ("no-q-lora", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.5,
                           q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8, norm_topk_prob=False)),
        # DeepSeek-V3's released YaRN settings (factor 40, mscale = mscale_all_dim = 1), smaller context
        ("yarn-mscale", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                             n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                             first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=8, norm_topk_prob=True, max_position_embeddings=10240,
                             rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=40.0, mscale=1.0,
                                                  mscale_all_dim=1.0, beta_fast=32, beta_slow=1,
                                                  original_max_position_embeddings=256))),
    ],
}

CONFIG_CLASSES = {
    "llama": "LlamaConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig", "deepseek_v3": "DeepseekV3Config",
}

ALL_CASES = [(fam, cid, kw) for fam, cases in CASES.items() for cid, kw in cases]


def hf_model(family: str, overrides: dict, seed: int = 0):
    """A random tiny HF model, eval mode, eager attention. Weights are redrawn with a larger std
    than HF's init so that logits and router scores are far from ties."""
    kwargs = {**BASE, **overrides}
    if "rope_theta" in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    cfg = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


def tiny_tokenizer_json(n_words: int = 40) -> str:
    """A real (loadable) word-level tokenizer.json with Llama's special tokens, ids below 64, for
    folders whose tiny models embed fewer ids than a byte-level BPE needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok.to_str()


def hf_forward(model, tokens: torch.Tensor):
    """Logits and each MoE layer's chosen experts (N, K), caught by hooks on the HF routers."""
    chosen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].detach()))
             for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    try:
        with torch.no_grad():
            logits = model(tokens).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def our_forward(model, tokens: torch.Tensor):
    with torch.no_grad():
        out = model(tokens)
    return out.logits, [s.expert_ids for s in out.router_stats]


def same_choices(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Per-token expert sets are equal (HF's DeepSeek router returns top-k unsorted)."""
    return len(a) == len(b) and all(
        torch.equal(x.sort(dim=-1).values, y.sort(dim=-1).values) for x, y in zip(a, b))
