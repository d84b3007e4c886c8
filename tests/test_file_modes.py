"""Files and folders moelab writes get the mode the umask gives (atomic writes go through a
temporary file, which tempfile would make 0600, and exports through a temporary folder, 0700):
shared runs on a cluster stay readable by the group."""

import json
import os
import stat
from pathlib import Path

import pytest

import moelab
from moelab.fileio import atomic_write, current_umask, write_text_atomic


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask_002):
    assert current_umask() == 0o002
    assert current_umask() == 0o002


def test_atomic_writes_get_the_umask_mode(tmp_path, umask_002):
    write_text_atomic(tmp_path / "a.txt", "x")
    from safetensors.torch import save_file
    import torch
    atomic_write(tmp_path / "w.safetensors", lambda t: save_file({"x": torch.zeros(2)}, t))
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "w.safetensors") == 0o664
    os.umask(0o077)
    write_text_atomic(tmp_path / "b.txt", "x")
    assert _mode(tmp_path / "b.txt") == 0o600


def test_a_rewritten_file_keeps_its_mode(tmp_path, umask_002):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "x")
    os.chmod(path, 0o640)
    write_text_atomic(path, "y")
    assert path.read_text() == "y" and _mode(path) == 0o640


def test_exported_folders_and_training_runs(tmp_path, umask_002, monkeypatch):
    from moelab.interop import export_hf
    from moelab.train.trainer import train
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                              for i in range(300)))
    cfg = moelab.resolve_config("dense", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64",
        "model.vocab_size=300", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=2",
        "train.max_steps=2", "train.eval_batches=1", f"data.corpus={corpus}"])
    run = tmp_path / "run"
    train(cfg, run, show_progress=False, log=lambda m: None)
    export_hf(run, tmp_path / "hf", "llama")
    seen = 0
    for root in (run, tmp_path / "hf", tmp_path / "cache"):
        assert _mode(root) == 0o775, root
        for path in root.rglob("*"):
            if path.is_symlink():
                continue
            expected = 0o775 if path.is_dir() else 0o664
            assert _mode(path) == expected, f"{path}: {oct(_mode(path))}"
            seen += 1
    assert seen > 10 and (run / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
