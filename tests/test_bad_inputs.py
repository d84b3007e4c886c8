"""The bad-input table: every command, on each bad input, exits with status 2 and one line
``error: ...`` naming the option or field, prints no traceback, and changes no file that was
there before (the whole test folder is hashed before and after; nothing new appears either).

Rows are data: add one for each new command or bad input. ``{name}`` in an argument is replaced
by a path from the ``inputs`` fixture (a small trained run, damaged and oversized copies of it,
files of the wrong kind); ``words`` must all appear in the error line. Rows run in-process
through ``moelab.cli.main`` (fast); the few that need a real process live in their own tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

import moelab
from moelab.cli import main
from moelab.data.corpus import val_mask
from moelab.train.trainer import train

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.ffn_hidden=64", "model.moe.expert_hidden=16", "model.moe.num_experts=4",
        "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=16", "train.max_steps=2",
        "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.device=cpu",
        "data.max_bytes=60000", "data.val_fraction=0.05"]
SETS = sum((["--set", s] for s in TINY), [])
HUGE = ["--set", "model.d_model=131072", "--set", "model.vocab_size=2000000", "--set", "model.n_heads=64"]


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...]          # each must appear in the error line
    as_root_too: bool = True        # False: permission bits do not stop root


ROWS = [
    # ---- sizes and counts: bounded before anything is allocated (issue 25, item 3) ----------
    Row("info-layers-1e9", ("info", "--set", "model.n_layers=1000000000"), ("model.n_layers", "1,024")),
    Row("info-vocab-1e12", ("info", "--set", "model.vocab_size=1000000000000"), ("model.vocab_size",)),
    Row("info-experts", ("info", "--preset", "mixtral", "--set", "model.moe.num_experts=100000"),
        ("model.moe.num_experts",)),
    Row("info-n-groups-0", ("info", "--preset", "deepseek-v3", "--set", "model.moe.n_groups=0"),
        ("model.moe.n_groups",)),
    Row("info-batch-negative", ("info", "--preset", "dense", "--batch", "-5"), ("--batch",)),
    Row("info-seq-len-huge", ("info", "--preset", "dense", "--seq-len", "10000000000"), ("--seq-len",)),
    Row("info-seed-huge", ("info", "--set", "train.seed=1000000000000000000000"), ("train.seed",)),
    Row("info-run-and-preset", ("info", "{run}", "--preset", "dense"), ("not both",)),
    Row("info-missing-run", ("info", "{tmp}/nowhere"), ("does not exist",)),
    Row("train-vocab-1e12", ("train", "--preset", "dense", "--out", "{tmp}/new",
                             "--set", "model.vocab_size=1000000000000"), ("model.vocab_size",)),
    Row("train-steps-1e10", ("train", "--preset", "dense", "--out", "{tmp}/new",
                             "--set", "train.max_steps=10000000000"), ("train.max_steps",)),
    Row("train-too-big-for-ram", ("train", "--preset", "dense", "--out", "{tmp}/new", *HUGE),
        ("needs at least", "available")),
    Row("eval-batches-1e9", ("eval", "{run}", "--batches", "1000000000"), ("--batches",)),
    Row("eval-batches-beyond-split", ("eval", "{run}", "--batches", "100000"),
        ("--batches", "validation split holds")),
    Row("eval-config-vocab-1e12", ("eval", "{vocab_1e12}"), ("model.vocab_size",)),
    Row("eval-too-big-for-ram", ("eval", "{too_big}"), ("needs at least", "available")),
    Row("generate-too-big-for-ram", ("generate", "{too_big}", "--prompt", "x"), ("needs at least", "available")),
    Row("plan-hf-layers-1e9", ("plan", "--hf-config", "{hf_layers_1e9}", "--gpus", "8", "--gpu-memory", "80GiB"),
        ("1000000000",)),
    Row("convert-hf-layers-1e9", ("convert", "--from-hf", "{hf_layers_1e9}", "--out", "{tmp}/imported-1e9"),
        ("model.n_layers",)),
    Row("info-hf-layers-1e9", ("info", "{hf_layers_1e9}"), ("model.n_layers",)),
    Row("plan-gpus-huge", ("plan", "--preset", "dense", "--gpus", "100000000000", "--gpu-memory", "80GiB"),
        ("--gpus",)),
    Row("plan-seq-len-huge", ("plan", "--preset", "dense", "--gpus", "8", "--gpu-memory", "80GiB",
                              "--seq-len", "100000000000"), ("--seq-len",)),
    # ---- run folders: no silent overwrite, no write through a link (items 1, 5, 12) -----------
    Row("train-out-holds-a-run", ("train", "--preset", "dense", "--out", "{run}", *SETS),
        ("already holds", "--resume", "--overwrite")),
    Row("train-out-holds-an-import", ("train", "--preset", "dense", "--out", "{imported}", *SETS),
        ("already holds", "model.safetensors")),
    Row("train-out-is-a-file", ("train", "--preset", "dense", "--out", "{file}", *SETS), ("not a folder",)),
    Row("train-out-empty", ("train", "--preset", "dense", "--out", ""), ("--out ''",)),
    Row("train-overwrite-without-out", ("train", "--preset", "dense", "--overwrite"), ("--overwrite",)),
    Row("train-resume-lock-symlink", ("train", "--resume", "{lock_link}"), ("symbolic link", ".lock")),
    Row("train-resume-metrics-symlink", ("train", "--resume", "{metrics_link}"),
        ("symbolic link", "metrics.jsonl")),
    Row("train-init-from-damaged", ("train", "--preset", "dense", "--out", "{tmp}/new", "--init-from",
                                    "{damaged}", *SETS), ("--init-from", "damaged")),
    Row("train-ep-3-of-8-experts", ("train", "--preset", "mixtral", "--out", "{tmp}/new",
                                    "--set", "parallel.ep=3"), ("parallel.ep = 3", "expert count")),
    Row("train-timeout-0", ("train", "--preset", "dense", "--out", "{tmp}/new", "--set", "parallel.timeout_s=0"),
        ("parallel.timeout_s",)),
    Row("compare-budget-empty", ("compare", "--budget", ""), ("--budget ''",)),
    Row("compare-out-empty", ("compare", "--out", ""), ("--out ''",)),
    Row("compare-short-validation-split", ("compare", "--models", "dense", "--budget", "2k", "--seeds", "1",
                                           "--out", "{tmp}/cmp", "--no-progress",
                                           "--set", "data.corpus='{short_val_corpus}'",
                                           "--set", "model.vocab_size=300", "--set", "model.max_seq_len=128",
                                           "--set", "train.batch_size=2", "--set", "train.seq_len=8",
                                           "--set", "train.eval_batches=1"),
        ("validation split", "data.max_bytes")),
    # ---- devices, prompt files, output folders (item 9) -----------------------------------------
    Row("generate-device-cuda", ("generate", "{run}", "--prompt", "x", "--device", "cuda"), ("--device",)),
    Row("generate-device-bogus", ("generate", "{run}", "--prompt", "x", "--device", "tpu"), ("--device",)),
    Row("generate-binary-prompt-file", ("generate", "{run}", "--prompt-file", "{binary}"),
        ("--prompt-file", "UTF-8")),
    Row("generate-missing-prompt-file", ("generate", "{run}", "--prompt-file", "{tmp}/nowhere.txt"),
        ("--prompt-file",)),
    Row("generate-empty-prompt", ("generate", "{run}", "--prompt", ""), ("--prompt",)),
    Row("generate-top-p-2", ("generate", "{run}", "--prompt", "x", "--top-p", "2"), ("--top-p",)),
    Row("train-device-cuda", ("train", "--preset", "dense", "--out", "{tmp}/new", *SETS,
                              "--set", "train.device=cuda"), ("train.device",)),
    Row("inspect-device-cuda", ("inspect", "{run}", "--device", "cuda"), ("--device",)),
    Row("inspect-out-under-a-file", ("inspect", "{run}", "--out", "{file}/report"), ("--out", "not a folder")),
    Row("inspect-out-read-only", ("inspect", "{run}", "--out", "{read_only}/report"), ("--out", "not writable"),
        as_root_too=False),
    Row("convert-out-under-a-file", ("convert", "--to-hf", "{run}", "--family", "llama", "--out", "{file}/hf"),
        ("--out", "not a folder")),
    Row("convert-out-read-only", ("convert", "--to-hf", "{run}", "--family", "llama", "--out", "{read_only}/hf"),
        ("--out", "not writable"), as_root_too=False),
    # ---- reads stay inside the run folder; commands added since (search, GGUF, llama.cpp) ------
    Row("generate-tokenizer-linked-outside", ("generate", "{tokenizer_link}", "--prompt", "x"),
        ("tokenizer.json", "outside")),
    Row("eval-config-linked-outside", ("eval", "{config_link}"), ("config.json", "outside")),
    Row("generate-llamacpp-cache-link", ("generate", "{gguf_link}", "--prompt", "x", "--engine", "llama.cpp",
                                         "--max-new-tokens", "1"), ("gguf", "symbolic link")),
    Row("convert-to-gguf-out-dangling-link", ("convert", "--to-gguf", "{run}", "--out", "{dangling}"),
        ("--out", "already exists")),
    Row("convert-to-gguf-too-big-for-ram", ("convert", "--to-gguf", "{too_big}", "--out", "{tmp}/big.gguf"),
        ("needs at least", "available")),
    Row("bench-moe-tokens-1e12", ("bench", "moe", "--tokens", "1000000000000"), ("--tokens",)),
    Row("bench-moe-too-big-for-ram", ("bench", "moe", "--d-model", "65536", "--expert-hidden", "65536",
                                      "--experts", "64"), ("needs at least", "available")),
    Row("bench-decode-new-tokens-1e9", ("bench", "decode", "{run}", "--new-tokens", "1000000000"),
        ("--new-tokens",)),
    Row("inspect-tokens-1e20", ("inspect", "{run}", "--tokens", "100000000000000000000"), ("--tokens",)),
    Row("inspect-too-big-for-ram", ("inspect", "{too_big}", "--out", "{tmp}/inspect-out"),
        ("needs at least", "available")),
    Row("search-out-holds-a-run", ("search", "--out", "{run}", "--trials", "1", *SETS),
        ("--out", "not empty")),
    Row("search-trials-1e12", ("search", "--out", "{tmp}/s", "--trials", "1000000000000"), ("--trials",)),
    Row("search-budget-400-digits", ("search", "--out", "{tmp}/s", "--budget-per-trial", "9" * 400),
        ("--budget-per-trial",)),
    Row("compare-budget-1e20", ("compare", "--budget", "100000000000000000000", "--out", "{tmp}/c"), ("--budget",)),
    Row("search-resume-damaged-settings", ("search", "--resume", "{bad_search}"), ("search.json", "JSON")),
    # ---- representative inputs that were already refused cleanly --------------------------------
    Row("unknown-key", ("info", "--set", "model.moe.topk=1"), ("model.moe.top_k",)),
    Row("unknown-preset", ("info", "--preset", "nope"), ("nope",)),
    Row("wrong-type", ("info", "--set", "model.d_model='wide'"), ("model.d_model", "wrong type")),
    Row("train-resume-not-a-run", ("train", "--resume", "{tmp}/nowhere"), ("nowhere",)),
    Row("train-resume-model-override", ("train", "--resume", "{run}", "--set", "model.n_layers=3"),
        ("model.n_layers",)),
    Row("eval-batches-0", ("eval", "{run}", "--batches", "0"), ("--batches",)),
    Row("eval-missing-run", ("eval", "{tmp}/nowhere"), ("nowhere",)),
    Row("generate-max-new-tokens-0", ("generate", "{run}", "--prompt", "x", "--max-new-tokens", "0"),
        ("--max-new-tokens",)),
    Row("plan-gpus-0", ("plan", "--preset", "dense", "--gpus", "0", "--gpu-memory", "80GiB"), ("--gpus",)),
    Row("plan-gpu-memory-abc", ("plan", "--preset", "dense", "--gpus", "8", "--gpu-memory", "abc"),
        ("--gpu-memory",)),
    Row("convert-missing-hf", ("convert", "--from-hf", "{tmp}/nowhere", "--out", "{tmp}/imp"), ("nowhere",)),
    # ---- the newer commands' outputs: never into someone's model or run ---------------------
    Row("compare-out-holds-a-run", ("compare", "--models", "dense", "--budget", "1k", "--out", "{run}"),
        ("--out", "not empty")),
    Row("compare-study-out-holds-an-import", ("compare", "--study", "granularity", "--out", "{imported}"),
        ("--out", "not empty")),
    Row("search-out-holds-a-run", ("search", "--preset", "hybrid", "--trials", "1", "--budget-per-trial", "1k",
                                   "--out", "{run}"), ("--out", "not empty")),
    Row("upcycle-out-holds-a-run", ("upcycle", "{run}", "--experts", "4", "--top-k", "2", "--out", "{imported}"),
        ("--out", "not empty")),
    Row("finetune-out-holds-an-import", ("finetune", "{run}", "--lora-rank", "2", "--corpus", "stdlib",
                                         "--out", "{imported}"), ("--out", "already holds a model")),
    Row("gguf-out-exists", ("convert", "--to-gguf", "{run}", "--out", "{file}"), ("--out", "already exists")),
]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cache = tmp_path_factory.getbasetemp() / "moelab-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE", str(cache))
        run = tmp_path_factory.mktemp("bad-inputs") / "run"
        train(moelab.resolve_config("moe", TINY), run, show_progress=False, log=lambda m: None)
    return run


def _edited_copy(run: Path, dest: Path, **model) -> Path:
    shutil.copytree(run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model"].update(model)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture
def inputs(trained, tmp_path, monkeypatch) -> dict[str, str]:
    """Every path a row can name, inside ``tmp_path`` (which the test hashes)."""
    monkeypatch.setenv("MOELAB_CACHE", str(trained.parent.parent / "moelab-cache"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    imported = tmp_path / "imported"                     # what convert --from-hf leaves: no ckpt-*
    imported.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(run / name, imported / name)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    lock_link, metrics_link = tmp_path / "lock-link", tmp_path / "metrics-link"
    outside = tmp_path / "outside.txt"
    outside.write_text("a file outside the run folder\n")
    for folder, name in ((lock_link, ".lock"), (metrics_link, "metrics.jsonl")):
        shutil.copytree(run, folder)
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(outside)
    hf = tmp_path / "hf-layers"
    hf.mkdir()
    source = Path(__file__).parent / "plan" / "hf_configs" / "llama-3-8b" / "config.json"
    hf_cfg = json.loads(source.read_text())
    hf_cfg["num_hidden_layers"] = 10**9
    (hf / "config.json").write_text(json.dumps(hf_cfg))
    corpus = tmp_path / "short-val-corpus"              # 20 files; the validation one is tiny
    corpus.mkdir()
    names = [f"doc{i:02d}.txt" for i in range(20)]
    for name, is_val in zip(names, val_mask(names, 0.05)):
        (corpus / name).write_text(" ".join(["the experts route every token"] * (2 if is_val else 80)) + "\n")
    outside_cfg = tmp_path / "outside-config.json"          # a real config, outside the run folder
    shutil.copy(run / "config.json", outside_cfg)
    tokenizer_link, config_link, gguf_link = (tmp_path / "tokenizer-link", tmp_path / "config-link",
                                              tmp_path / "gguf-link")
    for folder in (tokenizer_link, config_link, gguf_link):
        shutil.copytree(run, folder)
    (tokenizer_link / "tokenizer.json").unlink()
    (tokenizer_link / "tokenizer.json").symlink_to(run / "tokenizer.json")   # another run's, outside
    (config_link / "config.json").unlink()
    (config_link / "config.json").symlink_to(outside_cfg)
    (tmp_path / "elsewhere").mkdir()
    (gguf_link / "gguf").symlink_to(tmp_path / "elsewhere")
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "nowhere" / "model.gguf")
    bad_search = tmp_path / "bad-search"
    bad_search.mkdir()
    (bad_search / "search.json").write_text('{"version": 1, "trials": [')
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
    paths = {"tmp": tmp_path, "run": run, "imported": imported, "damaged": damaged,
             "lock_link": lock_link, "metrics_link": metrics_link, "hf_layers_1e9": hf,
             "tokenizer_link": tokenizer_link, "config_link": config_link, "gguf_link": gguf_link,
             "dangling": dangling, "bad_search": bad_search,
             "binary": binary, "short_val_corpus": corpus, "file": a_file, "read_only": read_only,
             "vocab_1e12": _edited_copy(run, tmp_path / "vocab-1e12", vocab_size=10**12),
             "too_big": _edited_copy(run, tmp_path / "too-big", d_model=131072, vocab_size=2_000_000,
                                     n_heads=64)}
    yield {k: str(v) for k, v in paths.items()}
    read_only.chmod(stat.S_IRWXU)


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> what it is (file hash, link target, folder, mode), links not followed."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link -> " + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir {oct(st.st_mode)}"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_clean_line_and_changes_nothing(row, inputs, tmp_path, capsys):
    if not row.as_root_too and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("permission bits do not stop root")
    argv = [a.format(**inputs) for a in row.argv]
    before = snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for word in row.words:
        assert word in errors[0], errors[0]
    assert snapshot(tmp_path) == before
