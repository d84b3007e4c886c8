"""Config rules of the encoder: presets `bert` / `bert-moe`, and routers that see the whole batch
or sequence allowed only with ``model.causal = false``."""

import dataclasses

import pytest

import moelab
from moelab import config as config_mod
from moelab.accounting import flops_per_token, param_counts
from moelab.config import ConfigError
from moelab.presets import preset_description


def test_bert_presets_are_masked_lm_encoders_at_matched_active_params():
    bert, bert_moe = moelab.resolve_config("bert"), moelab.resolve_config("bert-moe")
    for cfg in (bert, bert_moe):
        assert not cfg.model.causal and cfg.train.objective == "mlm"
        assert cfg.train.mlm_probability == 0.15
    assert bert.model.moe_layer_indices() == [] and bert_moe.model.moe_layer_indices() == [1, 3]
    dense, moe = param_counts(bert.model), param_counts(bert_moe.model)
    assert moe["total"] > 1.5 * dense["total"]
    # equal up to the routers' weights (d_model x experts per MoE layer)
    assert moe["active"] - dense["active"] == 2 * 256 * 8
    assert "Devlin et al. 2019" in preset_description("bert")
    assert "Lepikhin et al. 2020" in preset_description("bert-moe")


def test_an_encoder_attends_every_key_in_the_flop_count():
    bert = moelab.resolve_config("bert").model
    decoder = dataclasses.replace(bert, causal=True)
    T = 128
    gap = flops_per_token(bert, T)["attention"] - flops_per_token(decoder, T)["attention"]
    assert gap == flops_per_token(decoder, T)["attention"] * (T - 1) // (T + 1)


@pytest.fixture
def expert_choice(monkeypatch):
    """A router kind that routes by looking at the whole batch, registered as a future
    implementation would be (the config's Literal type does not list it yet, so the config is
    built with dataclasses.replace, past the type check)."""
    assert "expert_choice" in config_mod.SEQUENCE_ROUTER_KINDS
    monkeypatch.setattr(config_mod, "ROUTER_KINDS", config_mod.ROUTER_KINDS + ("expert_choice",))

    def with_router(preset: str, causal: bool):
        cfg = moelab.resolve_config(preset)
        moe = dataclasses.replace(cfg.model.moe, router="expert_choice")
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe, causal=causal))
    return with_router


def test_whole_sequence_routers_are_refused_in_a_decoder_by_name(expert_choice):
    with pytest.raises(ConfigError, match=r"model\.moe\.router = 'expert_choice' .*model\.causal = false"):
        expert_choice("moe", causal=True).validate()
    expert_choice("bert-moe", causal=False).validate()        # an encoder may use it


def test_token_choice_routers_stay_allowed_in_a_decoder():
    for router in config_mod.ROUTER_KINDS:
        assert router not in config_mod.SEQUENCE_ROUTER_KINDS
        moelab.resolve_config("moe", [f"model.moe.router={router}"])


def test_next_token_training_of_an_encoder_is_refused_but_building_it_is_not():
    cfg = moelab.resolve_config("bert", ["train.objective=clm"])      # a model to build and run
    with pytest.raises(ConfigError, match=r"train\.objective = 'clm' .*model\.causal = true"):
        cfg.validate_for_training()
    with pytest.raises(ConfigError, match=r"train\.objective = 'mlm' .*model\.causal = false"):
        moelab.resolve_config("bert", ["model.causal=true"])


@pytest.mark.parametrize("family,preset", [("llama", "bert"), ("mixtral", "bert-moe")])
def test_hf_export_refuses_an_encoder(family, preset, tmp_path):
    """Every family we export is a causal decoder: an encoder must not silently become one."""
    from moelab.interop import InteropError, export_hf
    from moelab.runfolder import save as save_run
    cfg = moelab.resolve_config(preset, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                                         "model.n_heads=4", "model.ffn_hidden=48",
                                         "model.moe.expert_hidden=24", "model.max_seq_len=32",
                                         "model.tie_embeddings=false", "model.moe.every=1"])
    save_run(tmp_path / "run", moelab.build(cfg), cfg)
    with pytest.raises(InteropError, match=f"cannot export to {family}: causal = false"):
        export_hf(tmp_path / "run", tmp_path / "out", family)
    assert not (tmp_path / "out").exists()
