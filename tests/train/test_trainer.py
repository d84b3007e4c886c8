"""Training on real text: loss goes down, resume is exact, saves are atomic, errors are named."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moelab
from moelab.cli import main
from moelab.runfolder import CheckpointError, checkpoint_dirs, load, load_metrics
from moelab.train.trainer import TrainingError, train

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.lr=0.003",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _cfg(preset="moe", *extra):
    return moelab.resolve_config(preset, TINY + list(extra))


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in load_metrics(run_dir) if r["kind"] == "train"]


def test_short_run_lowers_loss_and_writes_a_run_folder(tmp_path):
    cfg = _cfg("moe", "train.max_steps=30", "train.eval_every=15", "train.save_every=15")
    summary = train(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())                       # TensorBoard events
    evals = [r for r in load_metrics(run) if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    trains = [r for r in load_metrics(run) if r["kind"] == "train"]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(trains[0])
    assert {"load_cv", "max_over_mean", "dropped_fraction", "entropy"} <= set(trains[0]["router"][0])
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 32
    model = moelab.load(run)
    assert not model.training
    meta = json.loads((run / "run_meta.json").read_text())
    assert len(meta["corpus"]["sha256"]) == 64 and meta["corpus"]["num_bytes"] > 0


class _Stop(Exception):
    pass


def test_stop_and_resume_equals_uninterrupted_bit_for_bit(tmp_path, monkeypatch):
    # noisy router: the RNG state must round-trip through the checkpoint too
    extra = ("train.max_steps=12", "train.save_every=4", "train.eval_every=6", "model.moe.router=noisy")
    train(_cfg("moe", *extra), tmp_path / "full", show_progress=False, log=lambda m: None)

    import moelab.train.trainer as trainer_mod
    real_lr_at = trainer_mod.lr_at

    def stop_at_10(step, progress, cfg):
        if step == 9:          # dies during step 10, after the step-8 checkpoint
            raise _Stop()
        return real_lr_at(step, progress, cfg)

    monkeypatch.setattr(trainer_mod, "lr_at", stop_at_10)
    with pytest.raises(_Stop):
        train(_cfg("moe", *extra), tmp_path / "cut", show_progress=False, log=lambda m: None)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")][-1] == "ckpt-00000008"
    train(_cfg("moe", *extra), tmp_path / "cut", resume=True, show_progress=False, log=lambda m: None)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")   # exact floats, every step


@pytest.mark.slow
def test_kill_9_between_checkpoints_resumes_from_last(tmp_path):
    """A real SIGKILL between checkpoints; the resumed run must match an uninterrupted one."""
    run = tmp_path / "killed"
    sets = TINY + ["train.max_steps=150", "train.save_every=10", "train.eval_every=1000"]
    args = [sys.executable, "-m", "moelab", "train", "--preset", "dense", "--out", str(run), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        steps = [s for s, _ in _losses(run)] if (run / "metrics.jsonl").exists() else []
        if len(checkpoint_dirs(run)) >= 2 and steps and steps[-1] % 10 in (3, 4, 5, 6):
            proc.send_signal(signal.SIGKILL)
            killed_at = steps[-1]
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    ckpt_step = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    assert ckpt_step < killed_at
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    train(moelab.resolve_config("dense", sets), tmp_path / "full", show_progress=False, log=lambda m: None)
    assert _losses(run) == _losses(tmp_path / "full")          # exact, all 150 steps, no duplicates


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg("dense", "train.max_steps=8", "train.save_every=4", "train.eval_every=100")
    import safetensors.torch as st
    real_save = st.save_file
    failed = []

    def flaky_save(tensors, path, metadata=None):
        # the second checkpoint's optimizer file dies half way (its weights were written fine)
        if Path(path).parent.name == ".ckpt-00000008.tmp" and ".optimizer.safetensors" in Path(path).name:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)
            failed.append(path)
            raise OSError("disk full (simulated)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", flaky_save)
    with pytest.raises(CheckpointError, match="simulated"):
        train(cfg, run, show_progress=False, log=lambda m: None)
    monkeypatch.setattr(st, "save_file", real_save)
    assert len(failed) == 1
    assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000004"]
    assert not list(run.glob(".ckpt-*"))              # the half-written checkpoint is gone
    load(run)                                         # top-level weights still good
    summary = train(cfg, run, resume=True, show_progress=False, log=lambda m: None)
    assert summary["steps"] == 8


def test_bad_values_fail_fast_with_named_field(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--preset", "moe", "--set", "train.lr=-1", "--out", str(out)]) == 2
    assert "train.lr" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--preset", "moe", "--set", "train.max_step=5", "--out", str(out)]) == 2
    assert "train.max_steps" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--preset", "moe", "--set", "data.corpus=/no/such/path", "--out", str(out)]
                + sum([["--set", s] for s in TINY if not s.startswith("data.")], [])) == 2
    assert "data.corpus" in capsys.readouterr().err


def test_resume_of_a_non_run_or_damaged_checkpoint_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty)]) == 2
    assert "not a moelab run folder" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
    run = tmp_path / "run"
    train(_cfg("dense", "train.max_steps=4", "train.save_every=4"), run, show_progress=False, log=lambda m: None)
    opt = checkpoint_dirs(run)[-1] / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:50])            # truncate

    def files():   # the run's files; .lock only names whoever holds the folder's lock
        return sorted((p.name, p.stat().st_mtime) for p in run.rglob("*") if p.name != ".lock")
    before = files()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=8"]) == 2
    assert "damaged" in capsys.readouterr().err
    assert files() == before


def test_nonfinite_loss_is_caught_and_named(tmp_path):
    run = tmp_path / "run"
    train(_cfg("moe", "train.max_steps=2", "train.save_every=2"), run, show_progress=False, log=lambda m: None)
    from moelab.fileio import save_tensors
    from moelab.runfolder import load_tensors
    weights = load_tensors(run / "model.safetensors")
    weights["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    save_tensors(run / "model.safetensors", weights)
    with pytest.raises(TrainingError, match=r"step 1.*blocks\.1\.attn"):
        train(_cfg("moe", "train.max_steps=2"), tmp_path / "ft", init_from=run, show_progress=False,
              log=lambda m: None)
    train(_cfg("moe", "train.max_steps=2", "train.skip_nonfinite=true"), tmp_path / "ft2",
          init_from=run, show_progress=False, log=lambda m: None)
    assert all(r.get("skipped") for r in load_metrics(tmp_path / "ft2") if r["kind"] == "train")


def test_eval_command_json(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg("dense", "train.max_steps=3", "train.save_every=3"), run, show_progress=False, log=lambda m: None)
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["val_loss"], rel=1e-6)
    assert main(["eval", str(tmp_path / "nope")]) == 2


def test_init_from_keeps_the_source_runs_tokenizer(tmp_path):
    """Fine-tuning must tokenise with the tokenizer the weights were trained with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    src = tmp_path / "src"
    train(_cfg("dense", "train.max_steps=1", "train.save_every=1"), src, show_progress=False, log=lambda m: None)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["zebra quokka " * 200], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    tok.save(str(src / "tokenizer.json"))
    out = tmp_path / "ft"
    args = ["train", "--init-from", str(src), "--out", str(out), "--no-progress"]
    for s in TINY + ["train.max_steps=1", "train.save_every=1"]:
        if not s.startswith("model."):
            args += ["--set", s]
    assert main(args) == 0
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab() == tok.get_vocab()
