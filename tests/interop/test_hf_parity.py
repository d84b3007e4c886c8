"""Every family against transformers: import gives the same logits and expert choices, export gives
a model transformers loads and runs identically, and import -> export reproduces every tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moelab
from moelab.interop import export_hf, from_transformers, import_hf, to_transformers

from hf_models import (ALL_CASES, hf_forward, hf_model, our_forward, same_choices, tiny_tokenizer_json,
                       transformers)

TOL = 1e-4
IDS = [f"{fam}-{cid}" for fam, cid, _ in ALL_CASES]


def _tokens(vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (3, 24), generator=g)


@pytest.mark.parametrize("family,case,kwargs", ALL_CASES, ids=IDS)
def test_in_memory_both_ways(family, case, kwargs):
    hf = hf_model(family, kwargs)
    x = _tokens()
    hf_logits, hf_ids = hf_forward(hf, x)
    ours = from_transformers(hf)
    logits, ids = our_forward(ours, x)
    assert (logits - hf_logits).abs().max() < TOL
    assert same_choices(hf_ids, ids)
    assert len(ids) == len(ours.moe_layers())

    back = to_transformers(ours, family, attn_implementation="eager")
    back_logits, back_ids = hf_forward(back, x)
    assert (back_logits - logits).abs().max() < TOL
    assert same_choices(back_ids, ids)


@pytest.mark.parametrize("family,case,kwargs", ALL_CASES, ids=IDS)
def test_folders_round_trip(family, case, kwargs, tmp_path):
    hf = hf_model(family, kwargs)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB" if case.endswith("groups") else "5GB")
    assert (src / "model.safetensors.index.json").is_file() == case.endswith("groups")  # sharded
    (src / "tokenizer.json").write_text(tiny_tokenizer_json())
    x = _tokens()
    hf_logits, hf_ids = hf_forward(hf, x)

    import_hf(src, tmp_path / "run")
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(run_cfg) == {"model", "train", "data", "parallel"}
    assert (tmp_path / "run" / "tokenizer.json").read_text() == tiny_tokenizer_json()
    ours = moelab.load(tmp_path / "run")
    logits, ids = our_forward(ours, x)
    assert (logits - hf_logits).abs().max() < TOL
    assert same_choices(hf_ids, ids)

    export_hf(tmp_path / "run", tmp_path / "out", family)
    original = {}
    for f in src.glob("*.safetensors"):
        original.update(load_file(f))
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for k, t in original.items():
        assert exported[k].dtype == t.dtype and torch.equal(exported[k], t), k
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    re_logits, re_ids = hf_forward(reloaded.eval(), x)
    assert (re_logits - logits).abs().max() < TOL
    assert same_choices(re_ids, ids)


def test_deepseek_without_interleaved_rope():
    """rope_interleave=false needs no permutation; export writes interleaved and still matches."""
    _, _, kwargs = next(c for c in ALL_CASES if c[0] == "deepseek_v3")
    hf = hf_model("deepseek_v3", {**kwargs, "rope_interleave": False})
    x = _tokens()
    hf_logits, hf_ids = hf_forward(hf, x)
    ours = from_transformers(hf)
    logits, ids = our_forward(ours, x)
    assert (logits - hf_logits).abs().max() < TOL and same_choices(hf_ids, ids)
    back = to_transformers(ours, "deepseek_v3", attn_implementation="eager")
    assert back.config.rope_interleave
    assert (hf_forward(back, x)[0] - logits).abs().max() < TOL


def test_imported_expert_bias_is_the_router_bias():
    _, _, kwargs = next(c for c in ALL_CASES if c[0] == "deepseek_v3")
    hf = hf_model("deepseek_v3", kwargs)
    ours = from_transformers(hf)
    hf_bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(ours.blocks[1].ffn.router.expert_bias, hf_bias)
    assert ours.config.moe.router == "sigmoid" and ours.config.moe_layer_indices() == [1, 2]


TINY = ["model.vocab_size=96", "model.d_model=64", "model.n_layers=3", "model.max_seq_len=64",
        "model.ffn_hidden=48", "model.moe.expert_hidden=16"]
NATIVE = [
    ("mixtral", "mixtral", []),
    ("deepseek_v3", "deepseek-v3", ["model.norm_eps=1e-6", "model.moe.num_experts=8", "model.moe.n_groups=4",
                                    "model.moe.topk_groups=2", "model.moe.top_k=2", "model.mla.q_lora_rank=24"]),
    ("qwen2_moe", "moe", ["model.attn_bias=true", "model.moe.num_shared_experts=2", "model.moe.shared_expert_gate=true",
                          "model.moe.layers=[0, 2]", "model.moe.renormalize=false"]),
    ("qwen3_moe", "moe", ["model.qk_norm='head'", "model.moe.top_k=1", "model.moe.router='noisy'"]),
    ("olmoe", "moe", ["model.qk_norm='full'", "model.n_kv_heads=2"]),
    ("llama", "dense", []),
]


@pytest.mark.parametrize("family,preset,overrides", NATIVE, ids=[n[0] for n in NATIVE])
def test_native_models_export(family, preset, overrides, tmp_path):
    """Models built in moelab (not imported) export to a transformers model that agrees."""
    model = moelab.build(preset, TINY + overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
        for moe in model.moe_layers():
            if moe.cfg.router == "sigmoid":
                moe.router.expert_bias.normal_(0.0, 0.05)
    x = _tokens()
    logits, ids = our_forward(model, x)
    hf = to_transformers(model, family, attn_implementation="eager")
    hf_logits, hf_ids = hf_forward(hf, x)
    assert (hf_logits - logits).abs().max() < TOL
    assert same_choices(hf_ids, ids)


def test_export_in_shards_loads_in_transformers_and_back(tmp_path):
    _, _, kwargs = next(c for c in ALL_CASES if c[0] == "mixtral")
    hf = hf_model("mixtral", kwargs)
    x = _tokens()
    hf_logits, _ = hf_forward(hf, x)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    import_hf(src, tmp_path / "run2")
    export_hf(tmp_path / "run2", tmp_path / "out", "mixtral", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = {name: (tmp_path / "out" / name).stat().st_size for name in shards}
    total = sum(t.numel() * t.element_size() for name in shards for t in load_file(tmp_path / "out" / name).values())
    assert index["metadata"]["total_size"] == total
    big = max(t.numel() * t.element_size() for t in hf.state_dict().values())
    assert all(size < max(60_000, big) + 10_000 for size in sizes.values())       # header slack
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert (hf_forward(reloaded.eval(), x)[0] - hf_logits).abs().max() < TOL
    import_hf(tmp_path / "out", tmp_path / "run3")                                  # and back in
    assert (our_forward(moelab.load(tmp_path / "run3"), x)[0] - hf_logits).abs().max() < TOL
