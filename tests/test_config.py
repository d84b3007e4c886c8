"""Config: validation names the field, TOML and dotted overrides, unknown-key suggestions."""

import pytest

import moelab
from moelab.config import Config, ConfigError, apply_overrides, load_toml


@pytest.mark.parametrize("override,field,words", [
    ("model.moe.top_k=9", "model.moe.top_k", "num_experts"),
    ("model.n_heads=5", "model.n_heads", "divide d_model"),
    ("model.n_kv_heads=3", "model.n_kv_heads", "divide n_heads"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor", "> 0"),
    ("model.moe.capacity_factor=-1.5", "model.moe.capacity_factor", "> 0"),
    ("model.moe.router='bogus'", "model.moe.router", "softmax"),
    ("model.attention='flash'", "model.attention", "gqa"),
    ("model.moe.layers=[0, 7]", "model.moe.layers", "outside the model"),
    ("model.d_model=0", "model.d_model", "> 0"),
    ("model.n_layers=-2", "model.n_layers", "> 0"),
    ("model.moe.expert_hidden=0", "model.moe.expert_hidden", "> 0"),
    ("model.moe.num_experts=0", "model.moe.num_experts", "> 0"),
    ("model.moe.n_groups=3", "model.moe.n_groups", "divide num_experts"),
    ("model.moe.topk_groups=2", "model.moe.topk_groups", "n_groups"),
    ("model.moe.num_experts_per_layer=[4]", "model.moe.num_experts_per_layer", "per MoE layer"),
    ("train.lr=0", "train.lr", "> 0"),
    ("train.batch_size=0", "train.batch_size", "> 0"),
    ("data.val_fraction=1.5", "data.val_fraction", "(0, 1)"),
    ("model.d_model='wide'", "model.d_model", "wrong type"),
    ("parallel.ep=0", "parallel.ep", "> 0"),
    ("parallel.dp_shard=0", "parallel.dp_shard", "-1 for all ranks"),
    ("model.moe.balance_scope='batch'", "model.moe.balance_scope", "micro"),
    ("train.save_every_minutes=0", "train.save_every_minutes", "> 0"),
    ("train.objective='mlm'", "train.objective", "model.causal = false"),
    ("train.mlm_probability=1.0", "train.mlm_probability", "(0, 1)"),
])
def test_invalid_values_name_field_value_and_range(override, field, words):
    with pytest.raises(ConfigError) as err:
        moelab.resolve_config("mixtral", [override])
    message = str(err.value)
    assert field in message and words in message


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'model\.moe\.top_k'"):
        apply_overrides(Config(), ["model.moe.topk=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'train\.max_steps'"):
        apply_overrides(Config(), ["train.max_step=5"])


def test_required_override_keys_exist_and_apply():
    cfg = moelab.resolve_config("mixtral", [
        "model.moe.top_k=1", "model.moe.num_experts=16", "model.moe.expert_hidden=256",
        "model.n_layers=4", "model.d_model=256", "train.max_steps=7", "train.batch_size=2",
        "train.seq_len=64", "train.lr=0.001", "train.seed=3", "train.save_every=5",
        "train.eval_every=5", "model.moe.capacity_factor=none"])
    m, t = cfg.model, cfg.train
    assert (m.moe.top_k, m.moe.num_experts, m.moe.expert_hidden, m.n_layers, m.d_model) == (1, 16, 256, 4, 256)
    assert (t.max_steps, t.batch_size, t.seq_len, t.lr, t.seed) == (7, 2, 64, 0.001, 3)
    assert m.moe.capacity_factor is None


def test_toml_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nd_model = 128\nn_heads = 2\n[model.moe]\nlayers = [0]\ntop_k = 1\n"
                    "[train]\nmax_steps = 3\n")
    cfg = load_toml(path).validate()
    assert cfg.model.d_model == 128 and cfg.model.moe.layers == (0,) and cfg.train.max_steps == 3
    model = moelab.build(str(path))
    assert len(model.moe_layers()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_modle = 128\n")
    with pytest.raises(ConfigError, match="did you mean 'model.d_model'"):
        load_toml(bad)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'mixtral'"):
        moelab.build("mixtrel")


def test_training_checks_seq_len_against_the_model_context():
    cfg = moelab.resolve_config("dense", ["model.max_seq_len=64", "train.seq_len=128"])  # a model: fine
    with pytest.raises(ConfigError) as err:
        cfg.validate_for_training()
    assert "train.seq_len" in str(err.value) and "model.max_seq_len (64)" in str(err.value)
    moelab.resolve_config("dense", ["model.max_seq_len=64", "train.seq_len=64"]).validate_for_training()
