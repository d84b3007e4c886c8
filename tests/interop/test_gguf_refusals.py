"""What the GGUF exporter refuses, and that it refuses before writing: each refusal names the
config field and the reason; new router kinds and unknown config fields are refused by allow-list."""

import dataclasses
import json

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.config import ModelConfig, MoEConfig
from moelab.interop.gguf_arch import GGUFRefusal, choose

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=64", "model.ffn_hidden=48",
        "model.moe.num_experts=4", "model.moe.expert_hidden=16"]


def cfg(preset: str, *extra: str) -> ModelConfig:
    more = ["model.moe.num_experts=8", "model.moe.top_k=2"] if preset.startswith("deepseek") else []
    return moelab.resolve_config(preset, TINY + more + list(extra)).model


def refusal(m: ModelConfig) -> str:
    with pytest.raises(GGUFRefusal) as e:
        choose(m)
    return str(e.value)


@pytest.mark.parametrize("preset,extra,arch", [
    ("dense", [], "llama"),
    ("mixtral", [], "llama"),
    ("moe", ["model.qk_norm=full", "model.moe.renormalize=false"], "olmoe"),
    ("moe", ["model.qk_norm=head"], "qwen3moe"),
    ("moe", ["model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true", "model.moe.renormalize=false"],
     "qwen2moe"),
    ("deepseek-v3", [], "deepseek2"),
    ("moe", ["model.moe.router=noisy"], "llama"),
])
def test_architecture_choice(preset, extra, arch):
    assert choose(cfg(preset, *extra)).arch == arch


def test_encoder_is_refused():
    assert "model.causal = False" in refusal(cfg("bert"))


def test_interleaved_layers_are_refused_naming_the_field():
    msg = refusal(cfg("hybrid"))
    assert "model.moe.layers = [1]" in msg and "llama4" in msg


def test_expert_choice_router_is_refused_by_allow_list():
    # a router kind moelab may add (expert choice, hash, ...) is refused until the exporter maps it
    for kind in ("expert_choice", "hash", "sinkhorn", "reinforce", "relu"):
        m = dataclasses.replace(cfg("moe"), moe=dataclasses.replace(cfg("moe").moe, router=kind))
        assert f"model.moe.router = '{kind}'" in refusal(m)


def test_heterogeneous_experts_are_refused():
    m = cfg("moe")
    m = dataclasses.replace(m, moe=dataclasses.replace(m.moe, expert_hidden=(16, 32, 16, 32)))
    assert "model.moe.expert_hidden" in refusal(m) and "heterogeneous" in refusal(m)
    assert "num_experts_per_layer" in refusal(cfg("pr-moe", "model.n_layers=4", "model.moe.num_experts_per_layer=[4,4,8,8]"))


def test_unknown_config_field_is_refused_unless_default():
    """A field the exporter has never heard of (say the learned group gate another change adds) is
    refused when set, and harmless at its default."""
    Extended = dataclasses.make_dataclass("Extended", [("group_router", str, dataclasses.field(default="none"))],
                                          bases=(MoEConfig,), frozen=True, kw_only=True)
    base = cfg("moe")
    fields = {f.name: getattr(base.moe, f.name) for f in dataclasses.fields(MoEConfig)}
    assert choose(dataclasses.replace(base, moe=Extended(**fields))).arch == "llama"
    msg = refusal(dataclasses.replace(base, moe=Extended(**fields, group_router="learned")))
    assert "model.moe.group_router = 'learned'" in msg


@pytest.mark.parametrize("extra,field", [
    (["model.moe.renormalize=false"], "model.moe.renormalize"),                 # llama MoE renormalises
    (["model.qk_norm=full"], "model.moe.renormalize"),                          # olmoe does not
    (["model.qk_norm=full", "model.moe.renormalize=false", "model.n_kv_heads=1"], "model.n_kv_heads"),
    (["model.moe.router=sigmoid"], "model.moe.router"),                         # sigmoid needs MLA
    (["model.moe.num_shared_experts=1"], "model.moe.shared_expert_gate"),
    (["model.moe.routed_scaling=2.0"], "model.moe.routed_scaling"),
    (["model.moe.eval_capacity_factor=1.0"], "model.moe.eval_capacity_factor"),
    (["model.moe.n_groups=2", "model.moe.group_score=max"], "model.moe.group_score"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=2.0", "model.rope_scaling.original_max_seq_len=64"],
     "model.rope_scaling.kind"),
])
def test_refusals_name_the_field(extra, field):
    assert f"{field} = " in refusal(cfg("moe", *extra))


def test_deepseek2_needs_plain_shared_experts():
    assert "model.moe.num_shared_experts" in refusal(cfg("deepseek-v3", "model.moe.num_shared_experts=0"))


# ---------------------------------------------------------------------------------------------
# through the CLI: exit status 2, a one-line error, nothing written
# ---------------------------------------------------------------------------------------------

def _run_folder(tmp_path, preset, *extra):
    from moelab.runfolder import save as save_run
    c = moelab.resolve_config(preset, TINY + list(extra))
    torch.manual_seed(0)
    return save_run(tmp_path / preset, moelab.build(c), c)


def test_cli_refuses_an_encoder_and_writes_nothing(tmp_path, capsys):
    run = _run_folder(tmp_path, "bert")
    out = tmp_path / "bert.gguf"
    assert main(["convert", "--to-gguf", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export to GGUF: model.causal = False") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [run]


def test_cli_refuses_an_unknown_type(tmp_path, capsys):
    run = _run_folder(tmp_path, "dense")
    assert main(["convert", "--to-gguf", str(run), "--out", str(tmp_path / "x.gguf"), "--type", "q3_k"]) == 2
    err = capsys.readouterr().err
    assert "--type 'q3_k' is invalid: must be one of f32, f16, bf16, q8_0" in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_type_needs_to_gguf(tmp_path, capsys):
    run = _run_folder(tmp_path, "dense")
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf"), "--family", "llama",
                 "--type", "bf16"]) == 2
    assert "--type is for --to-gguf" in capsys.readouterr().err


def test_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    import sys
    run = _run_folder(tmp_path, "dense")
    monkeypatch.setitem(sys.modules, "gguf", None)        # as if the gguf extra were not installed
    assert main(["convert", "--to-gguf", str(run), "--out", str(tmp_path / "x.gguf")]) == 2
    assert 'pip install "moelab[gguf]"' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.delitem(sys.modules, "gguf")
    (run / "tokenizer.json").write_text(json.dumps({}))
    assert main(["generate", str(run), "--engine", "llama.cpp", "--prompt", "x"]) == 2
    assert 'pip install "moelab[gguf]"' in capsys.readouterr().err
