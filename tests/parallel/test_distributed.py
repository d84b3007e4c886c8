"""torch.distributed on this CPU: 2 gloo processes under torchrun, compared with one process.

Each torchrun start costs seconds, so each launch does several things (dist_worker.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.runfolder import checkpoint_dirs, load, load_metrics, load_tensors
from moelab.train.trainer import train

pytestmark = pytest.mark.slow      # every test starts torchrun

WORKER = Path(__file__).with_name("dist_worker.py")
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.eval_every=10",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]
MIXTRAL = TINY + ["model.n_kv_heads=1", "model.ffn_hidden=128", "model.moe.num_experts=4",
                  "model.moe.expert_hidden=64"]
DEEPSEEK = TINY + ["model.n_layers=3", "model.ffn_hidden=128", "model.moe.num_experts=8",
                   "model.moe.expert_hidden=32", "model.moe.top_k=2", "model.moe.n_groups=4",
                   "model.moe.topk_groups=2", "model.mla.kv_lora_rank=32", "model.mla.q_lora_rank=48",
                   "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8",
                   "model.mla.v_head_dim=16", "model.moe.bias_update_rate=0.01"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def torchrun(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_args(preset: str, sets: list[str]) -> list[str]:
    return ["--preset", preset] + sum((["--set", s] for s in sets), []) + ["--no-progress"]


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]


def assert_close_losses(a, b, rel=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y}"


def test_two_processes_equal_one_for_20_steps(tmp_path):
    """Dense with FSDP2; mixtral-shaped MoE with ep=2; deepseek-v3-shaped (MLA, shared expert,
    group-limited sigmoid routing with bias updates) with ep=2: per-step losses within 1e-5."""
    jobs = [("dense", TINY + ["model.ffn_hidden=128"], []),
            ("mixtral", MIXTRAL, ["parallel.ep=2"]),
            ("deepseek-v3", DEEPSEEK, ["parallel.ep=2"])]
    steps = ["train.max_steps=20", "train.save_every=20"]
    spec = [{"preset": p, "overrides": sets + steps + par, "out": str(tmp_path / f"{p}-2")}
            for p, sets, par in jobs]
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    torchrun(str(WORKER), "train", str(tmp_path / "jobs.json"), timeout=600)
    for preset, sets, _ in jobs:
        one = tmp_path / f"{preset}-1"
        train(moelab.resolve_config(preset, sets + steps), one, show_progress=False, log=lambda m: None)
        two = tmp_path / f"{preset}-2"
        assert len(losses(two)) == 20
        assert_close_losses(losses(two), losses(one))
        summary = json.loads((two / "summary.json").read_text())
        assert summary["world_size"] == 2 and len(summary["peak_memory_bytes_per_rank"]) == 2
    # communication is counted per rank and step
    record = [r for r in load_metrics(tmp_path / "mixtral-2") if r["kind"] == "train"][-1]
    comm = record["comm"]
    assert len(comm["alltoall_bytes"]) == 2 and min(comm["fsdp_bytes"]) > 0
    # dropless: all rows handed to the all-to-all, averaged over ranks, are exactly
    # 2 (fwd + bwd) x 2 MoE layers x 2 (dispatch + combine) x 64 tokens x k=2 x 64 wide x 4 bytes
    assert sum(comm["alltoall_bytes_with_local"]) / 2 == 2 * 2 * 2 * 64 * 2 * 64 * 4
    dense = [r for r in load_metrics(tmp_path / "dense-2") if r["kind"] == "train"][-1]["comm"]
    assert dense["alltoall_bytes"] == [0, 0]


def test_expert_parallel_layer_equals_one_process_forward_and_backward(tmp_path):
    torchrun(str(WORKER), "dispatch", str(tmp_path / "out.json"))
    results = json.loads((tmp_path / "out.json").read_text())
    for case in ("softmax", "sigmoid", "forced"):
        for what, err in results[case].items():
            if what.startswith(("output", "grad")):
                assert err < 1e-12, (case, what, err)
    assert results["forced"]["tokens_per_expert"][2:] == [0, 0]       # rank 1 received nothing
    assert results["capacity"]["finite"] and results["capacity"]["dropped"] > 0


def test_sharded_checkpoint_resumes_on_two_and_on_one_process(tmp_path):
    """SIGTERM to a 2-process run: it checkpoints and stops; resuming on 2 processes continues
    bit for bit, on 1 process within float tolerance; the consolidated weights load in one
    process and score the validation loss the run logged."""
    sets = MIXTRAL + ["parallel.ep=2", "train.max_steps=40", "train.save_every=100",
                      "train.eval_every=40"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun("-m", "moelab", "train", *train_args("mixtral", sets), "--out", str(full), timeout=600)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moelab", "train", *train_args("mixtral", sets), "--out", str(cut)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (cut / "metrics.jsonl").exists() and len(losses(cut)) >= 8:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    stopped = checkpoint_dirs(cut)
    assert stopped, "the stopped run left no checkpoint"
    step = int(stopped[-1].name.split("-")[1])
    assert 8 <= step < 40
    state = json.loads((stopped[-1] / "trainer_state.json").read_text())
    assert state["format"] == "sharded" and state["layout"]["ep"] == 2
    # resume on 2 processes: bit for bit
    two = tmp_path / "two"
    import shutil
    shutil.copytree(cut, two)
    torchrun("-m", "moelab", "train", "--resume", str(two), "--no-progress", timeout=600)
    assert losses(two) == losses(full)
    # resume on 1 process (no process group): the same curve within float tolerance
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert_close_losses(losses(cut), losses(full))
    # the consolidated weights: the run folder's model.safetensors holds every expert (full
    # tensors, as the checkpoint's shards assemble them) and scores, in one process, the
    # validation loss the 2-process run logged
    final = load_tensors(checkpoint_dirs(full)[-1] / "model.safetensors")
    model = load(full)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    assert model.blocks[0].ffn.experts.w_gate_up.shape[0] == 4
    logged = [r for r in load_metrics(full) if r["kind"] == "eval"][-1]["val_loss"]
    out = subprocess.run([sys.executable, "-m", "moelab", "eval", str(full), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert abs(json.loads(out.stdout)["val_loss"] - logged) < 1e-5


def test_one_process_checkpoint_resumes_on_two_with_expert_parallelism(tmp_path):
    sets = MIXTRAL + ["train.max_steps=16", "train.save_every=8", "train.eval_every=100"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(moelab.resolve_config("mixtral", sets), full, show_progress=False, log=lambda m: None)
    train(moelab.resolve_config("mixtral", sets), cut, show_progress=False, log=lambda m: None)
    import shutil
    for ckpt in checkpoint_dirs(cut)[1:]:     # keep the step-8 checkpoint: as if stopped there
        shutil.rmtree(ckpt)
    torchrun("-m", "moelab", "train", "--resume", str(cut), "--set", "parallel.ep=2", "--no-progress",
             timeout=600)
    assert_close_losses(losses(cut), losses(full))


def test_a_killed_rank_stops_the_job_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    sets = MIXTRAL + ["parallel.ep=2", "train.max_steps=400", "train.save_every=4", "train.eval_every=1000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moelab", "train", *train_args("mixtral", sets), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if len(checkpoint_dirs(run)) >= 2:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if workers:
                os.kill(int(workers[-1]), signal.SIGKILL)          # one rank dies
                killed = True
                break
        time.sleep(0.05)
    assert killed
    assert proc.wait(timeout=120) != 0                              # torchrun tears the job down
    newest = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    assert main(["train", "--resume", str(run), "--set", f"train.max_steps={newest + 4}", "--no-progress"]) == 0
    steps = [s for s, _ in losses(run)]
    assert steps == list(range(1, newest + 5))                      # one record per step
