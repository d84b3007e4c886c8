"""Run folders that survive: graceful SIGTERM, one writer, fallback to an intact checkpoint, a
full disk, time-based checkpoints."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.lock import FolderLock
from moelab.runfolder import checkpoint_dirs, load, load_metrics
from moelab.stop import EXIT_STOPPED
from moelab.train.trainer import train

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.lr=0.003",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _cfg(preset, *extra):
    return moelab.resolve_config(preset, TINY + list(extra))


def _losses(run):
    return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]


def _cli(preset, sets, out):
    args = [sys.executable, "-m", "moelab", "train", "--preset", preset, "--out", str(out), "--no-progress"]
    for s in TINY + sets:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path):
    # no periodic checkpoint at all: only the stop request saves one
    sets = ["train.max_steps=60", "train.save_every=100000", "train.save_every_minutes=none",
            "train.eval_every=1000"]
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("moe", sets, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(_losses(run)) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    assert f"moelab train --resume {run}" in err
    (ckpt,) = checkpoint_dirs(run)
    stopped_at = int(ckpt.name.split("-")[1])
    assert 5 <= stopped_at < 60 and _losses(run)[-1][0] == stopped_at
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    train(_cfg("moe", *sets), tmp_path / "full", show_progress=False, log=lambda m: None)
    assert _losses(run) == _losses(tmp_path / "full")           # bit for bit, every step once


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from moelab.lock import FolderLock; "
                               f"FolderLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    before = sorted(p.name for p in run.iterdir())
    sets = ["train.max_steps=2", "train.save_every=2"]
    assert main(["train", "--preset", "dense", "--out", str(run), "--no-progress"]
                + sum((["--set", s] for s in TINY + sets), [])) == 2
    err = capsys.readouterr().err
    assert "lock" in err and f"pid {holder.pid}" in err
    assert sorted(p.name for p in run.iterdir()) == before == [".lock"]
    # a killed holder leaves no stale lock: the kernel released it
    holder.kill()
    holder.wait()
    assert main(["train", "--preset", "dense", "--out", str(run), "--no-progress"]
                + sum((["--set", s] for s in TINY + sets), [])) == 0
    # and a finished run releases it too
    with FolderLock(run):
        pass


class _Stop(Exception):
    pass


def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, monkeypatch, capsys):
    extra = ("train.max_steps=12", "train.save_every=4", "train.keep_checkpoints=3", "train.eval_every=6",
             "train.save_every_minutes=none")
    train(_cfg("moe", *extra), tmp_path / "full", show_progress=False, log=lambda m: None)
    import moelab.train.trainer as trainer_mod
    real_lr_at = trainer_mod.lr_at

    def stop_at_10(step, progress, cfg):
        if step == 9:
            raise _Stop()
        return real_lr_at(step, progress, cfg)

    monkeypatch.setattr(trainer_mod, "lr_at", stop_at_10)
    run = tmp_path / "cut"
    with pytest.raises(_Stop):
        train(_cfg("moe", *extra), run, show_progress=False, log=lambda m: None)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    newest = checkpoint_dirs(run)[-1]
    assert newest.name == "ckpt-00000008"
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])                        # damaged
    # --strict-resume refuses and moves nothing
    assert main(["train", "--resume", str(run), "--strict-resume", "--no-progress"]) == 2
    assert "ckpt-00000008" in capsys.readouterr().err and newest.is_dir()
    # without it: named, moved aside (kept), resumed from step 4, and the curve is the same
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ckpt-00000008" in err and "damaged" in err and "ckpt-00000004" in err
    assert (run / "damaged-ckpt-00000008").is_dir()
    assert _losses(run) == _losses(tmp_path / "full")


@pytest.mark.slow
def test_a_save_past_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    sets = ["train.max_steps=4", "train.save_every=4", "train.eval_every=100", "train.save_every_minutes=none"]
    assert subprocess.run(_cli("moe", sets, run), capture_output=True).returncode == 0
    optimizer = (checkpoint_dirs(run)[0] / "optimizer.safetensors").stat().st_size
    weights = (run / "model.safetensors").stat().st_size
    assert weights < optimizer
    limit = (weights + optimizer) // 2            # the weights fit, the optimizer file does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "moelab", "train", "--resume", str(run),
                           "--set", "train.max_steps=8", "--no-progress"],
                          capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "ckpt-00000008" in proc.stderr and "bytes" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000004"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]     # its partial files are gone
    load(run)                                                       # top-level weights intact
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=8", "--no-progress"]) == 0


def test_time_based_checkpoints(tmp_path):
    run = tmp_path / "run"
    train(_cfg("dense", "train.max_steps=6", "train.save_every=100000", "train.save_every_minutes=0.00001",
               "train.keep_checkpoints=10", "train.eval_every=100"), run, show_progress=False, log=lambda m: None)
    assert [p.name for p in checkpoint_dirs(run)] == [f"ckpt-{s:08d}" for s in range(1, 7)]


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    """Recomputing each block in the backward gives the same losses and bias updates, bit for
    bit (DeepSeek-V3 bias balancing: replayed forwards must not count tokens twice)."""
    sets = ("train.max_steps=4", "train.save_every=4", "train.eval_every=100", "model.moe.router=sigmoid",
            "model.moe.bias_update_rate=0.01")
    train(_cfg("moe", *sets), tmp_path / "plain", show_progress=False, log=lambda m: None)
    train(_cfg("moe", *sets, "parallel.activation_checkpointing=true"), tmp_path / "ac",
          show_progress=False, log=lambda m: None)
    assert _losses(tmp_path / "ac") == _losses(tmp_path / "plain")
    bias = lambda run: [t for k, t in load(run).state_dict().items() if k.endswith("expert_bias")]
    assert all((a == b).all() for a, b in zip(bias(tmp_path / "ac"), bias(tmp_path / "plain")))
    assert any(b.abs().sum() > 0 for b in bias(tmp_path / "ac"))
    # sign updates cannot tell a doubled load from the true one: count directly
    model = moelab.build(_cfg("moe", *sets, "parallel.activation_checkpointing=true"))
    model.activation_checkpointing = True
    model.train()
    x = torch.randint(0, 512, (2, 16))
    out = model(x, targets=x)
    (out.loss + out.aux_loss).backward()
    assert all(m.router.load_seen.sum().item() == 2 * 16 * m.cfg.top_k for m in model.moe_layers())
