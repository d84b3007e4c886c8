"""Layouts: refused by name before any process group; torchrun environments checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import moelab
from moelab.cli import main
from moelab.config import ConfigError
from moelab.parallel.layout import plan_layout

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "model.ffn_hidden=128", "model.moe.num_experts=4",
        "model.moe.expert_hidden=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "data.max_bytes=1500000", "data.val_fraction=0.1"]


def test_layouts_fit_the_world_and_the_model():
    cfg = moelab.resolve_config("mixtral", ["parallel.ep=2"])
    layout = plan_layout(cfg, 4)
    assert (layout.dp_replicate, layout.dp_shard, layout.ep, layout.dp_shard_mod_ep) == (1, 4, 2, 2)
    hsdp = plan_layout(moelab.resolve_config("mixtral", ["parallel.dp_shard=2"]), 4)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 2)
    assert not plan_layout(cfg, 1).distributed              # one process ignores parallel.*


@pytest.mark.parametrize("preset,sets,world,words", [
    ("mixtral", ["parallel.ep=3"], 6, "parallel.ep = 3 is invalid: must divide the expert count"),
    ("mixtral", ["parallel.ep=4"], 2, "parallel.ep = 4 is invalid: must divide the FSDP sharding degree"),
    ("mixtral", ["parallel.dp_shard=3"], 4, "parallel.dp_shard = 3 is invalid"),
    ("dense", ["parallel.ep=2"], 2, "no MoE layers"),
    ("mixtral", ["train.batch_size=5"], 2, "train.batch_size = 5 is invalid on 2 processes"),
    ("pr-moe", ["parallel.ep=8", "train.batch_size=8"], 8, r"layer \d has 4"),
])
def test_bad_layouts_are_refused_by_name(preset, sets, world, words):
    with pytest.raises(ConfigError, match=words):
        plan_layout(moelab.resolve_config(preset, sets), world)


def test_nproc_refuses_a_bad_layout_before_starting_processes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "mixtral", "--nproc", "2", "--set", "parallel.ep=3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "parallel.ep = 3" in err and "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_a_missing_rendezvous_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MOELAB_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "moelab", "train", "--preset", "dense", "--out", str(tmp_path / "r")]
    for s in TINY:
        args += ["--set", s]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "MASTER_ADDR" in proc.stderr and "torchrun" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_nproc_trains_on_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["train", "--preset", "mixtral", "--nproc", "2", "--out", str(run), "--no-progress",
            "--set", "parallel.ep=2", "--set", "train.max_steps=3", "--set", "train.save_every=3"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    meta = json.loads((run / "run_meta.json").read_text())
    assert "experts over 2" in meta["layout"]
