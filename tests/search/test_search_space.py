"""The search space, sizing candidates to the budget, configs written back as TOML, and the small
pure parts of the report; no training here (fast)."""

import json

import optuna
import pytest

import moelab
from moelab.accounting import param_counts
from moelab.cli import main
from moelab.config import Config, ConfigError, load_toml
from moelab.search.candidate import (
    TOLERANCE, Candidate, check_space, fixed_patterns, model_overrides, size, target_of,
)
from moelab.search.findings import pareto_front, placement
from moelab.search.space import DEFAULT_SPACE, SPACE_KEYS, space_from_dict, suggest
from moelab.search.tomlfile import config_toml
from moelab.search.trialrun import MetricsFollower

TINY = ["model.n_layers=4", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32"]


def _random_candidates(space, n_layers, n):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, space, n_layers))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("spec, overrides", [("dense", TINY), ("dense", []), ("moe", TINY), ("pr-moe", TINY)])
def test_every_candidate_and_fixed_pattern_is_sized_within_two_percent(spec, overrides):
    base = moelab.resolve_config(spec, overrides)
    target = target_of(base)
    cands = _random_candidates(DEFAULT_SPACE, base.model.n_layers, 40) + list(fixed_patterns(base.model).values())
    assert any(c.dense for c in cands) and any(len(c.moe_layers) == base.model.n_layers for c in cands)
    for cand in cands:
        cfg = size(base, cand, target)
        active = param_counts(cfg.model)["active"]
        assert abs(active / target - 1) <= TOLERANCE, (cand, active, target)
        assert cfg.model.moe_layer_indices() == list(cand.moe_layers)
        assert [cfg.model.experts_in_layer(i) for i in cand.moe_layers] == list(cand.experts)
        if not cand.dense:
            assert cfg.model.moe.top_k == cand.top_k and cfg.model.ffn_hidden == base.model.ffn_hidden


def test_sized_counts_are_the_built_models_and_overrides_rebuild_them():
    base = moelab.resolve_config("dense", TINY)
    target = target_of(base)
    for cand in _random_candidates(DEFAULT_SPACE, 4, 6):
        cfg = size(base, cand, target)
        model = moelab.build(cfg)
        assert sum(p.numel() for p in model.parameters()) == param_counts(cfg.model)["total"]
        # what a trial's `moelab train --preset dense --set ...` builds is the sized model
        again = moelab.resolve_config("dense", TINY + model_overrides(base.model, cfg.model))
        assert again == cfg


def test_granularity_splits_experts_and_scales_top_k():
    space = space_from_dict({"moe_layers": [[0, 1, 2, 3]], "experts": [4], "top_k": [2],
                             "granularity": [4], "shared_experts": [0]}, 4)
    (cand,) = _random_candidates(space, 4, 1)
    assert cand.experts == (16, 16, 16, 16) and cand.top_k == 8 and cand.granularity == 4
    base = moelab.resolve_config("dense", TINY)
    coarse = size(base, Candidate((0, 1, 2, 3), (4,) * 4, 2), target_of(base))
    fine = size(base, cand, target_of(base))
    # the same active width cut 4 ways finer: expert width a quarter (to rounding)
    assert abs(fine.model.moe.expert_hidden * 4 - coarse.model.moe.expert_hidden) <= 4


@pytest.mark.parametrize("data, words", [
    ({"expertz": [4, 8]}, "unknown key 'expertz'; did you mean 'experts'?"),
    ({"top_k": [1, 8], "experts": [4, 8]}, "top_k = [1, 8] is invalid"),
    ({"granularity": [0, 2]}, "granularity = [0, 2] is invalid"),
    ({"moe_layers": [[0, 9]]}, "moe_layers = [[0, 9]] is invalid"),
    ({"moe_layers": "some"}, "moe_layers = 'some' is invalid"),
    ({"per_layer_experts": "yes"}, "per_layer_experts = 'yes' is invalid"),
    ({"shared_experts": [1, 1]}, "a choice repeats"),
])
def test_bad_space_is_refused_by_name(data, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
        space_from_dict(data, 4)


def test_bad_space_key_is_refused_by_the_command_before_any_trial(tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text('experts = [4, 8]\ngranularty = [1, 2]\n')
    out = tmp_path / "search"
    rc = main(["search", "--space", str(space), "--out", str(out), "--trials", "2", *sum((["--set", o] for o in TINY), [])])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'granularty'" in err and "did you mean 'granularity'" in err
    assert not out.exists()                                   # nothing written, nothing trained


def test_space_the_base_cannot_build_is_refused():
    base = moelab.resolve_config("dense", TINY + ["model.moe.n_groups=4", "model.moe.topk_groups=4"])
    space = space_from_dict({"experts": [2, 4]}, 4)
    with pytest.raises(ConfigError, match="experts=2.*cannot be built"):
        check_space(base, space, target_of(base))


def test_space_keys_are_documented():
    text = open("docs/search.md", encoding="utf-8").read()
    for key in SPACE_KEYS:
        assert f"`{key}`" in text, key


@pytest.mark.parametrize("spec, overrides", [("dense", []), ("deepseek-v3", ["model.n_layers=2"]),
                                             ("pr-moe", ["train.save_every_minutes=none", "data.max_bytes=1000"])])
def test_config_toml_rebuilds_the_config(tmp_path, spec, overrides):
    cfg = moelab.resolve_config(spec, overrides)
    text, nones = config_toml(cfg)
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert load_toml(path).with_overrides(nones).validate() == cfg
    assert ("train.save_every_minutes=none" in nones) == (cfg.train.save_every_minutes is None)
    assert isinstance(Config().to_dict(), dict)


def test_pareto_front_and_placement():
    rows = [{"number": i, "state": "complete", "val_loss": loss, "total_params": total, "tokens_per_s": tps}
            for i, (loss, total, tps) in enumerate([(3.0, 10, 100), (2.9, 20, 90), (3.1, 30, 120), (2.9, 25, 80)])]
    rows.append({"number": 9, "state": "pruned", "val_loss": None, "total_params": 1, "tokens_per_s": 500})
    assert pareto_front(rows, "total_params", higher_is_better=False) == [0, 1]
    assert pareto_front(rows, "tokens_per_s", higher_is_better=True) == [1, 0, 2]
    assert placement([], 4) == "all-dense" and placement([0, 1, 2, 3], 4) == "all-MoE"
    assert placement([0, 1], 4) == "early" and placement([2, 3], 4) == "late" and placement([0, 3], 4) == "spread"


def test_metrics_follower_reads_each_eval_once_across_a_resume_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"

    def rec(kind, step, loss=1.0):
        return json.dumps({"kind": kind, "step": step, "tokens": step * 10, "elapsed_s": step / 10.0,
                           "val_loss": loss}) + "\n"

    follow = MetricsFollower(tmp_path)
    assert follow.poll() == []
    path.write_text(rec("eval", 0) + rec("train", 1) + rec("eval", 2) + '{"kind": "tr')   # a half-written line
    assert [r["step"] for r in follow.poll()] == [0, 2]
    with open(path, "a") as f:
        f.write('ain", "step": 3}\n' + rec("eval", 4))
    assert [r["step"] for r in follow.poll()] == [4] and follow.last_step == 4
    path.write_text(rec("eval", 0) + rec("eval", 2))          # a resume truncated it to step 2
    assert follow.poll() == []
    with open(path, "a") as f:
        f.write(rec("train", 3) + rec("eval", 4, 0.5) + rec("eval", 6))
    assert [r["step"] for r in follow.poll()] == [6]


def test_score_at_time_reads_the_curve_at_the_tokens_reached_in_the_base_models_time():
    from moelab.search.objective import score_at_time
    evals = [{"tokens": t, "val_loss": loss} for t, loss in ((0, 8.0), (500, 6.0), (1000, 5.0))]
    assert score_at_time(evals, 100.0, 100.0, 1000) == pytest.approx(5.0)      # as fast: full budget
    assert score_at_time(evals, 50.0, 100.0, 1000) == pytest.approx(6.0)       # half as fast: 500 tokens
    assert score_at_time(evals, 75.0, 100.0, 1000) == pytest.approx(5.5)
    assert score_at_time(evals, 300.0, 100.0, 1000) == pytest.approx(5.0)      # faster: not extrapolated
