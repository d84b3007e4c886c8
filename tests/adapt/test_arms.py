"""Upcycled arms of `moelab compare --from RUN`: the spelling, the plan's units, and refusals."""

import json

import pytest

from moelab.adapt.arms import continuation_plan, flat_overrides, parse_arms
from moelab.config import ConfigError

from adapt_helpers import make_run, tiny_cfg


def test_arm_spelling_groups_keys_after_their_arm():
    arms = parse_arms("dense,upcycle:E=8,K=2,method=drop,upcycle:E=8,K=2,G=2,S=1,layers=1+3")
    assert [a.name for a in arms] == ["dense", "upcycle-drop-E8-K2", "upcycle-copy-E8-K2-G2-S1-L1+3"]
    assert arms[2].options.layers == "1,3" and arms[2].options.granularity == 2


@pytest.mark.parametrize("text,words", [
    ("upcycle:E=8,K=2", "must include dense"),
    ("dense,upcycle:E=8", "needs E= and K="),
    ("dense,upcycle:E=8,K=2,temp=3", "'temp=3'"),
    ("dense,moe", "unknown arm 'moe'"),
    ("dense,upcycle:E=8,K=2,upcycle:E=8,K=2", "an arm repeats"),
])
def test_bad_arms_are_refused_by_name(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_arms(text)


def test_flat_overrides_round_trip_through_the_config():
    import moelab
    cfg = tiny_cfg("moe", "model.moe.layers=[1]", "data.corpus=/some where/*.py")
    args = flat_overrides(cfg.model, "model") + flat_overrides(cfg.data, "data")
    again = moelab.resolve_config(moelab.Config(), args)
    assert again.model == cfg.model and again.data == cfg.data


def test_plan_continues_a_finished_dense_run(tmp_path, tokenizer_json):
    run = make_run(tmp_path / "dense", tiny_cfg("dense"), tokenizer_json)
    with pytest.raises(ConfigError, match="has not finished"):
        continuation_plan("dense,upcycle:E=4,K=2", str(run), "4k", 2, [], tmp_path / "cmp", "test")
    (run / "summary.json").write_text(json.dumps({"tokens": 10_000}))
    plan = continuation_plan("dense,upcycle:E=4,K=2,method=drop", str(run), "4k", 2, [], tmp_path / "cmp", "test")
    assert [m["name"] for m in plan["models"]] == ["dense", "upcycle-drop-E4-K2", "scratch-E4-K2"]
    assert len(plan["units"]) == 6 and plan["seeds"] == [1338, 1339]
    by_id = {u["id"]: u for u in plan["units"]}
    dense = by_id["dense-s1338-4k"]["train_args"]
    assert dense[:2] == ["--init-from", str(run.resolve())] and "train.max_tokens=4000" in dense
    up = by_id["upcycle-drop-E4-K2-s1339-4k"]["train_args"]
    assert up[1] == str(tmp_path / "cmp" / "upcycled" / "upcycle-drop-E4-K2-s1339")
    scratch = by_id["scratch-E4-K2-s1338-4k"]["train_args"]
    assert "train.max_tokens=14000" in scratch and "model.moe.num_experts=4" in scratch
    assert plan["continuation"]["upcycle"][0]["options"]["seed"] in (1338, 1339)
    with pytest.raises(ConfigError, match="only train"):
        continuation_plan("dense", str(run), "4k", 2, ["model.d_model=8"], tmp_path / "cmp", "test")
