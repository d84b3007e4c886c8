"""Inference measurements on a model's weights: cache bytes, weight bytes, the encoder case."""

import pytest
import torch

import moelab
from moelab.compare.measure import _inference_once, _summarise, _weight_bytes, kv_cache_bytes_per_token
from moelab.model.attention import cache_bytes_per_token

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.max_seq_len=64"]


@pytest.mark.parametrize("preset", ["dense", "deepseek-v2"])
def test_kv_cache_bytes_are_read_from_the_allocated_cache(preset):
    model = moelab.build(preset, TINY + ["model.mla.kv_lora_rank=16"] * (preset == "deepseek-v2"))
    assert kv_cache_bytes_per_token(model) == cache_bytes_per_token(model.config, 4)   # float32


def test_decode_numbers_and_weight_reads_of_a_sparse_model():
    model = moelab.build("moe", TINY).eval()
    prompts = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    rows = [_inference_once(model, prompts) for _ in range(2)]
    out = _summarise(model, rows, prompts)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8"):
        assert out[key] > 0 and len(out["rounds_" + key]) == 2
    fixed, per_expert = _weight_bytes(model)
    assert len(per_expert) == 2 and per_expert[0] == 3 * 64 * 64 * 4
    # batch 1 reads exactly the top-2 experts per layer; batch 8 reaches between 2 and all 8
    assert out["weight_bytes_per_token_batch1"] == fixed + 2 * 2 * per_expert[0]
    assert all(2 <= e <= 8 for e in out["experts_touched_batch8"])
    total = sum(p.numel() * 4 for p in model.parameters()) - model.embed.weight.numel() * 4
    assert out["weight_bytes_per_token_batch1"] < total


def test_an_encoder_gets_prefill_only_with_the_reason():
    model = moelab.build("dense", TINY + ["model.causal=false"]).eval()
    prompts = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    out = _summarise(model, [_inference_once(model, prompts)], prompts)
    assert out["prefill_tokens_per_s"] > 0
    assert out["decode_tokens_per_s"] is None and out["kv_cache_bytes_per_token"] is None
    assert "model.causal = false" in out["note"]
