"""LoRA with peft on moelab models: starts equal to the base, trains only the adapter, merged and
unmerged agree, adapter folders are peft's own format, and bad ranks / targets are refused."""

import json
import sys

import pytest
import torch

import moelab

peft = pytest.importorskip("peft")   # the test extra installs it; see pyproject.toml

from moelab.adapt.lora import (  # noqa: E402
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoraSpec, adapter_tensors, apply_lora, param_report,
    parse_targets, prepare_wrapped, resolve_targets, save_adapter,
)
from moelab.config import ConfigError  # noqa: E402

from adapt_helpers import make_run, spread_weights, tiny_cfg  # noqa: E402

ALL = ("attn", "ffn", "shared", "experts", "router")


def _hybrid(seed=0):
    """Layer 0 dense, layer 1 MoE with a shared expert: every kind of target exists."""
    cfg = tiny_cfg("moe", "model.moe.layers=[1]", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
                   "model.moe.num_shared_experts=1")
    torch.manual_seed(seed)
    return cfg, spread_weights(moelab.build(cfg), seed=seed)


def _tokens(seed=1):
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model, std=0.05, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def test_lora_starts_equal_and_training_moves_only_the_adapter():
    from moelab.train.optim import build_optimizer
    cfg, model = _hybrid()
    x = _tokens()
    with torch.no_grad():
        want = model(x).logits
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = apply_lora(model, LoraSpec(rank=4, targets=ALL, explicit=True))
    with torch.no_grad():
        assert torch.equal(pm(x).logits, want)                        # B = 0: the base function
    adapters = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    optimizer = build_optimizer(pm, cfg.train)                        # weight decay 0.1 included
    pm.train()
    for step in range(3):
        out = pm(x, targets=torch.roll(x, -1, dims=1))
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        pm.update_router_biases()
        optimizer.zero_grad(set_to_none=True)
    after = pm.get_base_model().state_dict()
    for key, value in base.items():                                   # bit-identical base tensors
        stored = after.get(key)
        if stored is None:                                            # wrapped: peft adds base_layer
            stored = next(v for k, v in after.items() if k.replace("base_layer.", "") == key)
        assert torch.equal(stored, value), key
    moved = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert set(moved) == set(adapters)                                # every adapter tensor trained
    kinds = {k for n in moved for k, marker in (("experts", ".experts."), ("router", ".router."),
                                                ("shared", ".shared."), ("attn", ".attn."),
                                                ("ffn", "blocks.0.ffn.")) if marker in n}
    assert kinds == set(ALL)


def test_merged_and_unmerged_outputs_agree():
    _, model = _hybrid()
    pm = apply_lora(model, LoraSpec(rank=4, targets=ALL, explicit=True))
    _randomise_adapters(pm)
    x = _tokens()
    with torch.no_grad():
        unmerged = pm(x).logits
        base_logits = pm.get_base_model()
        merged = pm.merge_and_unload()(x).logits
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert type(base_logits).__name__ == "Transformer"
    # the adapter is not a no-op
    _, plain = _hybrid()
    with torch.no_grad():
        assert (plain(x).logits - merged).abs().max().item() > 1e-3


def test_adapter_folder_round_trips_through_peft(tmp_path):
    _, model = _hybrid()
    pm = apply_lora(model, LoraSpec(rank=4, alpha=6, targets=ALL, explicit=True), base="/where/the/base/is")
    _randomise_adapters(pm)
    x = _tokens()
    with torch.no_grad():
        want = pm(x).logits
    save_adapter(pm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 6
    assert config["base_model_name_or_path"] == "/where/the/base/is"
    assert sorted(config["target_parameters"]) == ["blocks.1.ffn.experts.w_down", "blocks.1.ffn.experts.w_gate_up",
                                                   "blocks.1.ffn.router.gate"]
    _, fresh = _hybrid()
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))   # peft's own loader
    saved = adapter_tensors(pm)
    assert {k: v for k, v in adapter_tensors(loaded).items()}.keys() == saved.keys()
    assert all(torch.equal(adapter_tensors(loaded)[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert torch.equal(prepare_wrapped(loaded)(x).logits, want)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE), "pt") as f:
        assert all("lora_" in k for k in f.keys())                   # no base tensor in the folder


def test_parameter_report_matches_a_count_of_the_model():
    cfg, model = _hybrid()
    r = 4
    pm = apply_lora(model, LoraSpec(rank=r, targets=ALL, explicit=True))
    report = param_report(pm)
    assert report.total == sum(p.numel() for p in pm.parameters())
    assert report.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert report.frozen == sum(p.numel() for p in moelab.build(cfg).parameters())
    # by hand: r * (in + out) per matrix, per expert for stacked weights
    m = cfg.model
    E, H, D = m.moe.num_experts, m.moe.expert_hidden, m.d_model
    qkv_out = (m.n_heads + 2 * m.kv_heads) * m.attn_head_dim
    attn = 2 * r * ((D + qkv_out) + (m.n_heads * m.attn_head_dim + D))
    dense = r * ((D + 2 * m.ffn_hidden) + (m.ffn_hidden + D))
    shared = r * ((D + 2 * H) + (H + D))
    experts = E * r * ((D + 2 * H) + (H + D))
    router = r * (D + E)
    assert report.trainable == attn + dense + shared + experts + router
    assert report.optimizer_bytes == 8 * report.trainable
    assert f"{report.trainable:,} trainable of {report.total:,}" in report.line()


def test_default_targets_skip_what_the_model_lacks_and_the_router():
    _, model = _hybrid()
    targets = resolve_targets(model, LoraSpec(rank=4))
    assert set(targets.by_kind) == {"attn", "ffn", "shared", "experts"}
    dense = moelab.build(tiny_cfg("dense"))
    assert set(resolve_targets(dense, LoraSpec(rank=4)).by_kind) == {"attn", "ffn"}


@pytest.mark.parametrize("spec,words", [
    (LoraSpec(rank=40, targets=("attn",), explicit=True), r"--lora-rank = 40 is invalid for attn target blocks\.0\.attn\.qkv"),
    (LoraSpec(rank=8, targets=("router",), explicit=True), r"--lora-rank = 8 is invalid for router target blocks\.1\.ffn\.router\.gate \(4 x 32\)"),
    (LoraSpec(rank=4, targets=("experts",), explicit=True), None),
])
def test_a_rank_above_a_targets_dimension_is_refused_by_name(spec, words):
    _, model = _hybrid()
    if words is None:
        resolve_targets(model, spec)
        return
    with pytest.raises(ConfigError, match=words):
        resolve_targets(model, spec)


def test_unknown_or_absent_targets_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown target 'mlp'"):
        parse_targets("attn,mlp")
    with pytest.raises(ConfigError, match="no 'experts' tensors"):
        resolve_targets(moelab.build(tiny_cfg("dense")), LoraSpec(rank=2, targets=("experts",), explicit=True))


def test_cli_refuses_bad_rank_and_target_before_writing(tmp_path, tokenizer_json, corpus_dir, capsys):
    from moelab.cli import main
    base = make_run(tmp_path / "base", tiny_cfg("dense"), tokenizer_json)
    args = ["finetune", str(base), "--corpus", str(corpus_dir), "--out", str(tmp_path / "ft")]
    assert main(args + ["--lora-rank", "64"]) == 2
    assert "--lora-rank = 64 is invalid for attn target blocks.0.attn.qkv" in capsys.readouterr().err
    assert main(args + ["--lora-rank", "4", "--lora-targets", "attn,gate"]) == 2
    assert "unknown target 'gate'" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_without_peft_the_command_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    from moelab.cli import main
    monkeypatch.setitem(sys.modules, "peft", None)                     # import peft now fails
    assert main(["finetune", str(tmp_path), "--lora-rank", "4", "--corpus", "x", "--out", str(tmp_path / "o")]) == 2
    assert "moelab[finetune]" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_adapter_gradients():
    def grads(checkpointing):
        _, model = _hybrid()
        pm = apply_lora(model, LoraSpec(rank=4, targets=ALL, explicit=True))
        _randomise_adapters(pm)
        pm.train()
        pm.get_base_model().activation_checkpointing = checkpointing
        x = _tokens()
        out = pm(x, targets=x)
        (out.loss + out.aux_loss).backward()
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    plain, replayed = grads(False), grads(True)
    assert plain.keys() == replayed.keys() and all(torch.equal(plain[k], replayed[k]) for k in plain)


@pytest.mark.parametrize("env,extra,words", [
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, [], "runs in one process"),
    ({}, ["train.compile=true"], "train.compile = true is not supported"),
])
def test_unsupported_runs_are_refused_by_name(env, extra, words, tmp_path, tokenizer_json, corpus_dir, monkeypatch):
    from moelab.adapt.finetune import finetune
    base = make_run(tmp_path / "base", tiny_cfg("dense"), tokenizer_json)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=words):
        finetune(base, LoraSpec(rank=4), str(corpus_dir), tmp_path / "ft", extra)
    assert not (tmp_path / "ft").exists()


def test_out_holding_a_model_without_checkpoints_is_never_written(tmp_path, tokenizer_json, corpus_dir, capsys):
    """An upcycled or imported folder has weights but no ckpt-*: finetune --out must refuse it,
    leaving every file as it was (issue 25: no silent overwrite)."""
    from moelab.cli import main
    base = make_run(tmp_path / "base", tiny_cfg("dense"), tokenizer_json)
    other = make_run(tmp_path / "other", tiny_cfg("dense"), tokenizer_json, seed=1)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert main(["finetune", str(base), "--lora-rank", "4", "--corpus", str(corpus_dir), "--out", str(other)]) == 2
    assert "already holds a model or run (config.json, model.safetensors" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
