"""`moelab finetune` end to end (slow: each trains in the real trainer): the adapter folder
evaluates and generates as its merged folder does, holds no base weight, works on a Hugging Face
folder, and survives SIGTERM, a second writer and kill -9, resuming bit for bit."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

peft = pytest.importorskip("peft")

from moelab.adapt.lora import ADAPTER_WEIGHTS_FILE  # noqa: E402
from moelab.cli import main  # noqa: E402
from moelab.runfolder import WEIGHTS_FILE, checkpoint_dirs, load_metrics  # noqa: E402

from adapt_helpers import make_run, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.slow

FT = ["--set", "train.save_every=3", "--set", "train.lr=0.01", "--set", "train.warmup_steps=1"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_out(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _hf_llama_folder(tmp_path, tokenizer_json):
    hf_models = pytest.importorskip("hf_models")
    hf = hf_models.hf_model("llama", dict(num_key_value_heads=2, intermediate_size=48, vocab_size=512,
                                          hidden_size=32, num_hidden_layers=2, rope_theta=1e4))
    hf.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text(tokenizer_json)
    return tmp_path / "llama"


@pytest.mark.parametrize("kind", ["moelab-moe", "hf-llama"])
def test_adapter_folder_equals_its_merged_folder(kind, tmp_path, tokenizer_json, corpus_dir, capsys):
    if kind == "hf-llama":
        base, weights = _hf_llama_folder(tmp_path, tokenizer_json), "model.safetensors"
    else:
        cfg = tiny_cfg("moe", "model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.num_shared_experts=1")
        base, weights = make_run(tmp_path / "base", cfg, tokenizer_json), WEIGHTS_FILE
    before = _sha(base / weights)
    ft = tmp_path / "ft"
    capsys.readouterr()
    assert main(["finetune", str(base), "--lora-rank", "4", "--corpus", str(corpus_dir), "--out", str(ft),
                 "--merge", "--no-progress", "--set", "train.max_steps=6", *FT]) == 0
    log = capsys.readouterr()
    assert "trainable of" in log.out + log.err                       # counts and memory printed first
    assert _sha(base / weights) == before                            # the base is untouched
    assert not (ft / WEIGHTS_FILE).exists()                          # and not copied
    assert (ft / ADAPTER_WEIGHTS_FILE).is_file() and (ft / "merged" / WEIGHTS_FILE).is_file()
    a = _json_out(capsys, ["eval", str(ft), "--json"])
    m = _json_out(capsys, ["eval", str(ft / "merged"), "--json"])
    assert abs(a["val_loss"] - m["val_loss"]) < 1e-5
    gen = ["--prompt", "def dumps(", "--temperature", "0", "--max-new-tokens", "16", "--json"]
    ga = _json_out(capsys, ["generate", str(ft), *gen])
    gm = _json_out(capsys, ["generate", str(ft / "merged"), *gen])
    assert ga["tokens"] == gm["tokens"] and ga["finish_reason"] == gm["finish_reason"] and ga["tokens"]
    # --base finds a moved base
    moved = tmp_path / "moved"
    base.rename(moved)
    assert main(["eval", str(ft), "--json"]) == 2
    assert "pass --base" in capsys.readouterr().err
    again = _json_out(capsys, ["eval", str(ft), "--base", str(moved), "--json"])
    assert again["val_loss"] == a["val_loss"]


def test_finetune_survives_sigterm_a_second_writer_and_kill_9(tmp_path, tokenizer_json, corpus_dir, capsys):
    cfg = tiny_cfg("moe", "model.moe.num_experts=4", "model.moe.expert_hidden=32")
    base = make_run(tmp_path / "base", cfg, tokenizer_json)
    steps = ["--set", "train.max_steps=60", "--set", "train.save_every=4", "--set", "train.lr=0.01",
             "--set", "train.warmup_steps=2", "--set", "train.save_every_minutes=none"]
    new = ["finetune", str(base), "--lora-rank", "4", "--corpus", str(corpus_dir), "--no-progress", *steps]
    assert main(new + ["--out", str(tmp_path / "full")]) == 0
    want = [(r["step"], r["loss"]) for r in load_metrics(tmp_path / "full") if r["kind"] == "train"]

    run = tmp_path / "cut"

    def losses():
        return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]

    def start(argv):
        return subprocess.Popen([sys.executable, "-m", "moelab", *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def wait_for(proc, condition, what):
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if condition():
                return
            time.sleep(0.02)
        pytest.fail(f"the run ended or timed out before {what}")

    # 1. SIGTERM: finishes its step, checkpoints, exits 75; meanwhile a second writer is refused
    proc = start(new + ["--out", str(run)])
    wait_for(proc, lambda: bool(checkpoint_dirs(run)) and len(losses()) >= 5, "its first checkpoint")
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 2    # in-process: no start-up delay
    assert "locked" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 75
    stopped = losses()[-1][0]
    assert int(checkpoint_dirs(run)[-1].name.split("-")[1]) == stopped

    # 2. resume, then kill -9 between checkpoints
    proc = start(["train", "--resume", str(run), "--no-progress"])       # train --resume knows a fine-tune
    wait_for(proc, lambda: len(losses()) and losses()[-1][0] >= stopped + 6 and losses()[-1][0] % 4 in (1, 2),
             "a step between checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = losses()[-1][0]
    assert int(checkpoint_dirs(run)[-1].name.split("-")[1]) < killed_at

    # 3. resume to the end: every step's loss equals the uninterrupted run's, bit for bit
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 0
    assert losses() == want
    assert torch.equal(*(torch.tensor(_adapter(p)) for p in (run, tmp_path / "full")))
    meta = json.loads((run / "run_meta.json").read_text())
    assert meta["parent"] == str(base.resolve())


def _adapter(run):
    from moelab.runfolder import load_tensors
    tensors = load_tensors(run / ADAPTER_WEIGHTS_FILE)
    return [v.flatten().tolist() for _, v in sorted(tensors.items())][0]
