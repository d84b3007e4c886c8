"""A compare that is stopped, locked or spread over processes."""

import json
import signal
import subprocess
import sys
import time

import pytest

from moelab.cli import main
from moelab.lock import FolderLock
from moelab.runfolder import checkpoint_dirs
from moelab.stop import EXIT_STOPPED

pytestmark = pytest.mark.slow      # compares in subprocesses, torchrun

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _set(overrides):
    return sum((["--set", s] for s in overrides), [])


def test_a_locked_compare_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    with FolderLock(out):
        rc = main(["compare", "--models", "dense", "--seeds", "1", "--budget", "1k", "--out", str(out),
                   "--no-progress", *_set(TINY)])
    assert rc == 2 and "lock" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_sigterm_stops_the_unit_in_training_and_resume_finishes(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "moelab", "compare", "--models", "dense", "--seeds", "1", "--budget", "40k",
           "--out", str(out), "--no-progress", *_set(TINY + ["train.save_every_minutes=none"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "dense-s1337-40k" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_STOPPED, err
    assert f"moelab compare --resume {out}" in err
    run = metrics.parent
    assert checkpoint_dirs(run) and not (run / "summary.json").exists()
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["models"][0]["tokens"] >= 40_000


def test_compare_on_two_processes_reports_communication(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--models", "mixtral", "--seeds", "1", "--budget", "2k", "--nproc", "2",
               "--out", str(out), "--no-progress",
               *_set(TINY + ["model.n_kv_heads=1", "parallel.ep=2", "train.log_every=1"])])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    model = results["models"][0]
    assert results["nproc"] == 2 and model["alltoall_bytes_per_step"] > 0 and model["fsdp_bytes_per_step"] > 0
    assert "## Communication (2 processes)" in (out / "report.md").read_text()
