"""Sizing models to equal parameter counts (--match), checked on the models actually built."""

import pytest

import moelab
from moelab.accounting import param_counts
from moelab.compare.matching import match_models
from moelab.compare.plan import build_plan, parse_budget
from moelab.config import ConfigError

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.max_seq_len=64", "train.seq_len=32"]
NAMES = ["dense", "moe", "hybrid"]


def _built_counts(spec, overrides):
    """(total, active) of the built model: total counted from its parameters."""
    cfg = moelab.resolve_config(spec, overrides)
    model = moelab.build(cfg)
    return sum(p.numel() for p in model.parameters()), param_counts(cfg.model)["active"]


def _plan(tmp_path, match, models=NAMES, overrides=TINY):
    return build_plan(models, [parse_budget("2k")], ["2k"], 1, match, overrides, tmp_path, "test")


def test_match_both_gives_equal_total_and_active(tmp_path):
    plan = _plan(tmp_path, "both")
    sparse = [m for m in plan["models"] if m["name"] != "dense"]
    counts = [_built_counts(m["spec"], TINY + m["overrides"]) for m in sparse]
    (t0, a0), (t1, a1) = counts
    assert abs(t1 / t0 - 1) <= 0.05 and abs(a1 / a0 - 1) <= 0.05
    hybrid = next(m for m in plan["models"] if m["name"] == "hybrid")
    assert hybrid["overrides"], "the hybrid needed resizing to match the all-MoE model on both"
    assert hybrid["sizing"]["matched_on"] == "active and total" and hybrid["sizing"]["within_5_percent"]
    dense = next(m for m in plan["models"] if m["name"] == "dense")
    assert dense["sizing"]["matched_on"] == "active" and "dense model's total" in dense["sizing"]["note"]
    assert any("total and active" in line for line in plan["matching"])


@pytest.mark.parametrize("mode, which", [("total", 0), ("active", 1)])
def test_match_total_and_active_against_the_dense_model(tmp_path, mode, which):
    plan = _plan(tmp_path, mode, ["dense", "moe", "hybrid", "deepseek-moe"])
    ref = _built_counts("dense", TINY)[which]
    for m in plan["models"]:
        got = _built_counts(m["spec"], TINY + m["overrides"])[which]
        assert abs(got / ref - 1) <= 0.05, (m["name"], got, ref)
    moe = next(m for m in plan["models"] if m["name"] == "moe")
    if mode == "total":                     # 8 experts must shrink to fit the dense model's total
        assert "model.moe.expert_hidden" in moe["sizing"]["changes"]
    else:                                   # the presets are matched on active by design
        assert moe["overrides"] == []


def test_matching_that_cannot_be_reached_is_named():
    cfgs = [moelab.resolve_config(n, TINY + ["model.vocab_size=8000"]).model for n in ("dense", "moe")]
    # a dense model far smaller than the sparse one's attention + embeddings
    small = moelab.resolve_config("dense", TINY + ["model.ffn_hidden=1"]).model
    with pytest.raises(ConfigError, match="expert_hidden"):
        match_models(["dense", "moe"], [small, cfgs[1]], "total")
    with pytest.raises(ConfigError, match="--match"):
        match_models(["dense", "moe"], cfgs, "flops")


def test_each_seed_starts_one_model_later(tmp_path):
    """The unit order rotates the models per seed (and restarts per budget), so every model
    takes every position in its seed once per three seeds."""
    plan = build_plan(NAMES, [parse_budget("2k"), parse_budget("4k")], ["2k", "4k"], 4, "active",
                      TINY, tmp_path, "test")
    seeds = plan["seeds"]
    order = [(u["budget"], u["seed"], u["model"]) for u in plan["units"]]
    expected = []
    for budget in ("2k", "4k"):
        for i, seed in enumerate(seeds):
            rotated = NAMES[i % 3:] + NAMES[:i % 3]
            expected += [(budget, seed, m) for m in rotated]
    assert order == expected
    assert len({u["id"] for u in plan["units"]}) == 2 * 4 * 3
