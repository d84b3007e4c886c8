"""The new routers under expert parallelism (2 gloo processes, torchrun) against one process.

Every router that routes a token from its own row, its own sequence or global sums (hash, expert
choice per sequence, Sinkhorn with its column totals summed over ranks, ReLU with its L1 loads
summed over ranks, the learned group gate) gives the same layer forward and backward, and 20
training steps with the same per-step losses. REINFORCE is checked at inference (greedy) only:
in training each process draws its own samples, so two processes are a different, equally valid
draw (docs/routers.md). Heterogeneous experts refuse ep > 1 (the config says so).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moelab
from moelab.runfolder import load_metrics
from moelab.train.trainer import train

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("router_ep_worker.py")
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "model.ffn_hidden=128", "model.moe.num_experts=4",
        "model.moe.expert_hidden=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.eval_every=10", "train.max_steps=20",
        "train.save_every=20", "data.max_bytes=1500000", "data.val_fraction=0.1"]
JOBS = [("hash-moe", []), ("sbase-moe", []), ("remoe", []), ("bert-ec", []),
        ("moe", ["model.moe.n_groups=2", "model.moe.topk_groups=1", "model.moe.group_router=learned"])]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def torchrun(*args: str, timeout: float = 900) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def test_expert_parallel_layer_of_each_router_equals_one_process(tmp_path):
    torchrun(str(WORKER), "layer", str(tmp_path / "out.json"))
    results = json.loads((tmp_path / "out.json").read_text())
    for case, errs in results.items():
        assert errs["tokens"] == errs["tokens_ref"], case
        for what, err in errs.items():
            if what.startswith(("output", "grad")):
                assert err < 1e-12, (case, what, err)
        assert errs["aux_loss"] < 1e-6, case          # the balance loss is computed in float32


def test_two_processes_with_ep_2_train_as_one_for_20_steps(tmp_path):
    spec = [{"preset": p, "overrides": TINY + sets + ["parallel.ep=2"], "out": str(tmp_path / f"{i}-2")}
            for i, (p, sets) in enumerate(JOBS)]
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    torchrun(str(WORKER), "train", str(tmp_path / "jobs.json"))
    for i, (preset, sets) in enumerate(JOBS):
        one = tmp_path / f"{i}-1"
        train(moelab.resolve_config(preset, TINY + sets), one, show_progress=False, log=lambda m: None)
        a = [(r["step"], r["loss"]) for r in load_metrics(tmp_path / f"{i}-2") if r["kind"] == "train"]
        b = [(r["step"], r["loss"]) for r in load_metrics(one) if r["kind"] == "train"]
        assert len(a) == len(b) == 20, preset
        for (step, x), (_, y) in zip(a, b):
            assert abs(x - y) <= 1e-5 * abs(y), f"{preset} {sets} step {step}: {x} vs {y}"
