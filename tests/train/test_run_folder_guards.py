"""Run folders nobody breaks by accident (issue 25): `--out` never overwrites a model unless
told to, a torn metrics line is repaired on resume, no write follows a symbolic link, stale
temporaries are cleaned, and each full-disk message names what actually failed."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import moelab
from moelab.cli import main
from moelab.fileio import SymlinkRefused, open_no_follow, write_json
from moelab.lock import FolderLock
from moelab.runfolder import CheckpointError, checkpoint_dirs, load_metrics
from moelab.train.runlog import RunLogger
from moelab.train.trainer import train

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.ffn_hidden=64", "model.moe.expert_hidden=16", "model.moe.num_experts=4",
        "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1",
        "train.log_every=1", "train.warmup_steps=1", "train.save_every_minutes=none",
        "data.max_bytes=60000", "data.val_fraction=0.05"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _cfg(*extra):
    return moelab.resolve_config("moe", TINY + list(extra))


def _args(*extra):
    return sum((["--set", s] for s in TINY + list(extra)), [])


def _losses(run):
    return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]


def _quiet(m):
    pass


# ---- item 1: --out refuses a folder holding a model or run files ---------------------------------

def test_overwrite_replaces_an_imported_model_and_its_checkpoints(tmp_path, capsys):
    old = tmp_path / "old"
    train(_cfg("train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=5"), old,
          show_progress=False, log=_quiet)
    assert [p.name for p in checkpoint_dirs(old)] == ["ckpt-00000001", "ckpt-00000002"]
    (old / "notes.txt").write_text("mine\n")                     # not a run file: kept
    # the old run's tracker ids: a new run must not log into the old run's wandb / MLflow run
    (old / "trackers.json").write_text('{"wandb": {"id": "old-run"}}\n')
    before = (old / "model.safetensors").read_bytes()
    args = ["train", "--preset", "moe", "--out", str(old), "--no-progress",
            *_args("train.max_steps=1", "train.save_every=1", "train.seed=7")]
    assert main(args) == 2                                       # refused: names what it found
    err = capsys.readouterr().err
    assert "ckpt-00000001" in err and "--resume" in err and "--overwrite" in err
    assert (old / "model.safetensors").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    assert "--overwrite: removed" in capsys.readouterr().err
    assert [p.name for p in checkpoint_dirs(old)] == ["ckpt-00000001"]   # the old run's are gone
    assert [s for s, _ in _losses(old)] == [1]
    assert (old / "notes.txt").read_text() == "mine\n"
    assert not (old / "trackers.json").exists()
    assert (old / "model.safetensors").read_bytes() != before


def test_a_folder_with_only_a_lock_or_unrelated_files_is_a_new_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("notes\n")
    with FolderLock(out):                                        # leaves .lock behind
        pass
    assert main(["train", "--preset", "moe", "--out", str(out), "--no-progress",
                 *_args("train.max_steps=1", "train.save_every=1")]) == 0


# ---- item 2: a torn last metrics line, then --resume ----------------------------------------------

class _Stop(Exception):
    pass


def test_a_torn_metrics_line_is_cut_on_resume_and_the_curve_is_unchanged(tmp_path, monkeypatch, capsys):
    extra = ("train.max_steps=6", "train.save_every=3", "train.eval_every=100")
    train(_cfg(*extra), tmp_path / "full", show_progress=False, log=_quiet)
    import moelab.train.trainer as trainer_mod
    real = trainer_mod.lr_at

    def stop_after_3(step, progress, cfg):
        if step == 3:
            raise _Stop()
        return real(step, progress, cfg)

    monkeypatch.setattr(trainer_mod, "lr_at", stop_after_3)
    cut = tmp_path / "cut"
    with pytest.raises(_Stop):
        train(_cfg(*extra), cut, show_progress=False, log=_quiet)
    monkeypatch.setattr(trainer_mod, "lr_at", real)
    with open(cut / "metrics.jsonl", "a") as f:                  # a full disk cut the append short
        f.write('{"kind": "train", "step": 4, "tokens": 12')
    assert len(load_metrics(cut)) == 4                           # readers skip the torn line
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "incomplete record" in err and "truncated" in err
    assert _losses(cut) == _losses(tmp_path / "full")           # bit for bit, every step once
    assert (cut / "metrics.jsonl").read_text().endswith("}\n")


# ---- item 5: no write through a symbolic link -----------------------------------------------------

def test_an_atomic_write_replaces_a_link_and_never_writes_its_target(tmp_path):
    target = tmp_path / "outside.json"
    target.write_text("keep me\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").symlink_to(target)
    write_json(folder / "config.json", {"a": 1})                 # rename(2) replaces the link itself
    assert target.read_text() == "keep me\n"
    assert not (folder / "config.json").is_symlink()
    assert json.loads((folder / "config.json").read_text()) == {"a": 1}


def test_the_lock_and_the_metrics_refuse_a_link(tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(SymlinkRefused, match="symbolic link"):
        FolderLock(run).acquire()
    (run / ".lock").unlink()
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(SymlinkRefused, match="metrics.jsonl"):
        RunLogger(run, show_progress=False, log=_quiet)
    with pytest.raises(SymlinkRefused):
        open_no_follow(run / "metrics.jsonl", os.O_WRONLY | os.O_APPEND)
    assert target.read_text() == "keep me\n"
    os.symlink(tmp_path, run / "tb")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(SymlinkRefused, match="tb"):
        RunLogger(run, show_progress=False, log=_quiet)


def test_a_resume_with_a_linked_lock_leaves_the_target_intact(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg("train.max_steps=1", "train.save_every=1"), run, show_progress=False, log=_quiet)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(target)
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=2", "--no-progress"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep me\n"


# ---- item 12: housekeeping ---------------------------------------------------------------------

def test_stale_temporaries_are_removed_when_the_run_starts_again(tmp_path):
    run = tmp_path / "run"
    train(_cfg("train.max_steps=1", "train.save_every=1"), run, show_progress=False, log=_quiet)
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)   # kill -9 in the copy
    (run / ".ckpt-00000007.tmp").mkdir()                                 # kill -9 in a save
    (run / ".ckpt-00000007.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=2", "--no-progress"]) == 0
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_top_level_copy_says_the_checkpoint_is_complete(tmp_path, monkeypatch):
    """Only the copy of the newest checkpoint's weights to RUN/model.safetensors fails (the disk
    fills exactly then): the message says so, and the run resumes from that checkpoint."""
    import moelab.train.checkpoint as checkpoint_mod
    real = checkpoint_mod.atomic_write
    run = tmp_path / "run"

    def disk_full_for_the_top_level_weights(path, write):
        if Path(path) == run / "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(checkpoint_mod, "atomic_write", disk_full_for_the_top_level_weights)
    with pytest.raises(CheckpointError) as err:
        train(_cfg("train.max_steps=2", "train.save_every=2"), run, show_progress=False, log=_quiet)
    message = str(err.value)
    assert "checkpoint ckpt-00000002 is complete" in message and "model.safetensors" in message
    assert "No space left on device" in message and "could not write checkpoint" not in message
    assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000002"]


def test_init_from_a_damaged_run_is_refused_before_any_work(tmp_path, capsys):
    source = tmp_path / "source"
    train(_cfg("train.max_steps=1", "train.save_every=1"), source, show_progress=False, log=_quiet)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    out = tmp_path / "out"
    assert main(["train", "--preset", "moe", "--out", str(out), "--init-from", str(source),
                 "--no-progress", *_args("train.max_steps=1")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert not out.exists()                                      # no .lock, no tb/
