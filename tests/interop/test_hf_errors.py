"""Bad input and inexpressible models: clear errors naming the field or tensor, exit status 2
from the CLI, and nothing written to --out."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelab
from moelab.cli import main
from moelab.interop import InteropError, export_hf, import_hf, to_transformers
from moelab.runfolder import save as save_run

from hf_models import hf_model

MIXTRAL = dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture
def mixtral_dir(tmp_path):
    d = tmp_path / "mixtral"
    hf_model("mixtral", MIXTRAL).save_pretrained(d)
    return d


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _import_fails(src, out, *fragments):
    with pytest.raises(InteropError) as err:
        import_hf(src, out)
    for f in fragments:
        assert f in str(err.value), str(err.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return str(err.value)


# ---- import ---------------------------------------------------------------------------------

def test_no_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    _import_fails(tmp_path / "empty", tmp_path / "run", "no config.json")


def test_unsupported_family(mixtral_dir, tmp_path):
    _edit_config(mixtral_dir, model_type="gpt2")
    _import_fails(mixtral_dir, tmp_path / "run", "model_type = 'gpt2'", "supported")


@pytest.mark.parametrize("changes,fragment", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                           "original_max_position_embeddings": 16, "long_factor": [1.0]}), "long_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}), "original_max_position_embeddings = None"),
    (dict(sliding_window=16), "sliding_window = 16"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok = 1"),
])
def test_config_values_we_cannot_honour(mixtral_dir, tmp_path, changes, fragment):
    _edit_config(mixtral_dir, **changes)
    _import_fails(mixtral_dir, tmp_path / "run", fragment)


def test_olmoe_clip_qkv_and_deepseek_eps(tmp_path):
    olmoe = tmp_path / "olmoe"
    hf_model("olmoe", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2)).save_pretrained(olmoe)
    _edit_config(olmoe, clip_qkv=8.0)
    _import_fails(olmoe, tmp_path / "run", "clip_qkv = 8.0")
    ds = tmp_path / "ds"
    hf_model("deepseek_v3", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                                 num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None,
                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)).save_pretrained(ds)
    _edit_config(ds, rms_norm_eps=1e-5)
    _import_fails(ds, tmp_path / "run2", "rms_norm_eps")


def test_missing_and_mismatched_tensors(mixtral_dir, tmp_path):
    path = mixtral_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    _import_fails(mixtral_dir, tmp_path / "run", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                  "model.layers.0.self_attn.o_proj.weight (64, 32)", "model.layers.0.extra.weight")


def test_truncated_safetensors(mixtral_dir, tmp_path):
    path = mixtral_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _import_fails(mixtral_dir, tmp_path / "run", "model.safetensors", "truncated")


def test_pickle_is_never_loaded(mixtral_dir, tmp_path):
    (mixtral_dir / "model.safetensors").unlink()
    (mixtral_dir / "pytorch_model.bin").write_bytes(b"not opened")
    _import_fails(mixtral_dir, tmp_path / "run", "pytorch_model.bin", "never loaded")


def test_out_must_be_new(mixtral_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="not empty"):
        import_hf(mixtral_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---- export refusals ------------------------------------------------------------------------

MOE = dict(num_experts=4, top_k=2, expert_hidden=16)


@pytest.mark.parametrize("family,model,fragment", [
    ("mixtral", dict(moe={**MOE, "eval_capacity_factor": 1.0}), "eval_capacity_factor"),
    ("mixtral", dict(moe={**MOE, "num_experts_per_layer": [4, 8]}), "num_experts_per_layer"),
    ("mixtral", dict(moe={**MOE, "router": "sigmoid"}), "moe.router = 'sigmoid'"),
    ("mixtral", dict(moe={**MOE, "top_k": 1, "renormalize": False}), "renormalize"),
    ("mixtral", dict(moe={**MOE, "layers": [1]}), "MoE layers [1]"),
    ("olmoe", dict(qk_norm="full", moe={**MOE, "num_shared_experts": 1}), "num_shared_experts"),
    ("qwen3_moe", dict(moe=MOE), "qk_norm"),
    ("qwen2_moe", dict(moe=MOE), "shared_expert_gate"),
    ("llama", dict(moe=MOE), "MoE layers"),
    ("deepseek_v3", dict(moe=MOE), "multi-head latent attention"),
    ("deepseek_v3", dict(attention="mla", moe={**MOE, "router": "sigmoid", "num_shared_experts": 1}), "norm_eps"),
    ("mixtral", dict(moe={**MOE, "n_groups": 2}), "n_groups"),
])
def test_export_refuses(family, model, fragment, tmp_path):
    cfg = moelab.Config().with_overrides({"model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 2,
                                          "model.n_heads": 4, "model.ffn_hidden": 48, "model.max_seq_len": 32})
    data = cfg.to_dict()
    for k, v in model.items():
        data["model"][k] = {**data["model"][k], **v} if isinstance(v, dict) else v
    cfg = moelab.config.from_dict(moelab.Config, data).validate()
    save_run(tmp_path / "run", moelab.build(cfg), cfg)
    out = tmp_path / "out"
    with pytest.raises(InteropError, match=f"cannot export to {family}") as err:
        export_hf(tmp_path / "run", out, family)
    assert fragment in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_export_refuses_nonzero_softmax_bias(tmp_path):
    cfg = moelab.Config().with_overrides({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4,
                                          "model.vocab_size": 64, "model.moe.num_experts": 4,
                                          "model.moe.expert_hidden": 16, "model.moe.bias_update_rate": 0.01})
    model = moelab.build(cfg.validate())
    model.blocks[0].ffn.router.expert_bias[1] = 0.5
    with pytest.raises(InteropError, match="expert_bias"):
        to_transformers(model, "mixtral")


def test_training_only_settings_are_noted(tmp_path):
    cfg = moelab.Config().with_overrides({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4,
                                          "model.vocab_size": 64, "model.moe.num_experts": 4,
                                          "model.moe.expert_hidden": 16, "model.moe.router": "noisy",
                                          "model.moe.z_loss_coef": 0.001, "model.moe.capacity_factor": 1.25}).validate()
    save_run(tmp_path / "run", moelab.build(cfg), cfg)
    notes = export_hf(tmp_path / "run", tmp_path / "out", "mixtral")
    text = " ".join(notes)
    assert "noisy" in text and "z_loss_coef" in text and "capacity_factor" in text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mixtral"


# ---- CLI ------------------------------------------------------------------------------------

def test_cli_round_trip_and_errors(mixtral_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["convert", "--from-hf", str(mixtral_dir), "--out", str(run)]) == 0
    assert moelab.load(run)(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 96)
    assert main(["convert", "--to-hf", str(run), "--out", str(out), "--family", "mixtral"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "x"), "--family", "llama"]) == 2
    assert "cannot export to llama" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "z")]) == 0   # family: the imported one
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert json.loads((tmp_path / "z" / "config.json").read_text())["model_type"] == "mixtral"


def test_shard_plan_and_sizes():
    import torch
    from moelab.interop import InteropError
    from moelab.interop.folders import parse_size, plan_shards
    t = {"a": torch.zeros(10), "b": torch.zeros(30), "c": torch.zeros(5), "d": torch.zeros(5)}   # 40/120/20/20 B
    assert plan_shards(t, 100) == [["a"], ["b"], ["c", "d"]]          # b alone exceeds: its own shard
    assert plan_shards(t, 10**9) == [["a", "b", "c", "d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500 MiB") == 500 * 2**20 and parse_size("1234") == 1234
    for bad in ("big", "0", "-1MB"):
        with pytest.raises(InteropError, match="max shard size"):
            parse_size(bad)


def test_a_field_transformers_defaults_is_taken_from_transformers():
    """config.json files in the wild omit fields the config class defaults (rms_norm_eps here);
    transformers fills them in, and so does the import."""
    import transformers
    from moelab.interop.hf import config_from_hf
    hf = {"model_type": "mixtral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2}
    imported = config_from_hf(hf)
    assert imported.config.model.norm_eps == transformers.MixtralConfig().rms_norm_eps
