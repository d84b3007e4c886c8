"""Every user error in the commands of the ecosystem issue is one `error:` line and exit status 2,
never a traceback: a table of bad inputs, each run through the CLI in this process."""

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.runfolder import save as save_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moelab.data.tokenizer import train_bpe
    cfg = moelab.resolve_config("dense", ["model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                          "model.ffn_hidden=64", "model.vocab_size=300", "model.max_seq_len=32"])
    folder = tmp_path_factory.mktemp("runs") / "run"
    save_run(folder, moelab.build(cfg), cfg, tokenizer_json=train_bpe(["def f(x):\n  return x\n"] * 9, 300).to_str())
    return folder


@pytest.fixture(scope="module")
def truncated(run, tmp_path_factory):
    import shutil
    folder = tmp_path_factory.mktemp("runs") / "truncated"
    shutil.copytree(run, folder)
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "binary.txt").write_bytes(bytes(range(128, 256)))
    (d / "plain").write_text("a file, not a folder")
    (d / "x.ini").write_text("[model]\n")
    return d


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = [
    pytest.param(["generate", "{run}", "--prompt", "x", "--device", "cuda"], "no CUDA device", marks=NO_CUDA,
                 id="generate-cuda-missing"),
    pytest.param(["generate", "{run}", "--prompt", "x", "--device", "cuda:99"], "cuda:99", id="generate-cuda-index"),
    pytest.param(["generate", "{run}", "--prompt", "x", "--device", "tpu"], "--device 'tpu'", id="generate-bad-device"),
    pytest.param(["generate", "{run}", "--prompt-file", "{files}/binary.txt"], "not UTF-8", id="prompt-file-binary"),
    pytest.param(["generate", "{run}", "--prompt-file", "{files}"], "not a file", id="prompt-file-folder"),
    pytest.param(["generate", "{truncated}", "--prompt", "x"], "tokenizer.json", id="generate-truncated-tokenizer"),
    pytest.param(["bench", "moe", "--device", "cuda", "--tokens", "8"], "CUDA", marks=NO_CUDA, id="bench-cuda"),
    pytest.param(["info", "--preset", "dense", "--batch", "0"], "--batch = 0", id="info-batch-0"),
    pytest.param(["info", "--config", "{files}/x.ini"], "TOML or YAML", id="config-suffix"),
    pytest.param(["info", "--config", "{files}/missing.yaml"], "does not exist", id="config-missing-yaml"),
    pytest.param(["config", "--preset", "x.toml"], "--config", id="preset-that-is-a-file"),
    pytest.param(["plan", "--config", "{files}/missing.yaml", "--gpus", "1", "--gpu-memory", "1GiB"],
                 "does not exist", id="plan-config-yaml"),
    pytest.param(["convert", "--to-hf", "{run}", "--out", "{files}/plain/out"], "cannot write", id="convert-out-under-a-file"),
    pytest.param(["convert", "--to-hf", "{files}", "--out", "{files}/o2"], "config.json", id="convert-not-a-run"),
]


@pytest.mark.parametrize("argv,fragment", CASES)
def test_one_line_exit_2(argv, fragment, run, files, truncated, capsys):
    argv = [a.format(run=run, files=files, truncated=truncated) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_operating_system_errors_are_one_line(tmp_path, capsys):
    """An OSError the user can fix (here a file name longer than the file system allows; likewise
    a read-only or full disk) is one line naming the path, not a traceback."""
    name = str(tmp_path / ("a" * 300 + ".toml"))
    assert main(["info", "--config", name]) == 2
    assert capsys.readouterr().err == f"error: {name}: File name too long\n"
