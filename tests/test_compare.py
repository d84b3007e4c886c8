"""`moelab compare` end to end at a tiny size: report files, consistent numbers, real PNGs, resume."""

import json
import math
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.compare.analysis import count_spikes, interpolate
from moelab.compare.run import parse_budget

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.max_seq_len=64",
        "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _args(out, budget="3k"):
    args = ["compare", "--budget", budget, "--out", str(out), "--no-progress"]
    for s in TINY:
        args += ["--set", s]
    return args


def _finite_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)


def test_compare_writes_a_consistent_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(_args(out)) == 0
    printed = capsys.readouterr().out
    assert "What this run shows" in printed and "dense" in printed
    for name in ("report.md", "results.json", "val_loss_vs_tokens.png", "val_loss_vs_time.png",
                 "throughput_memory.png", "expert_load_moe.png", "expert_load_hybrid.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    results = json.loads((out / "results.json").read_text())
    for key in ("corpus_sha256", "machine", "torch", "command"):
        assert results[key]
    models = {m["name"]: m for m in results["models"]}
    assert set(models) == {"dense", "moe", "hybrid"}
    for m in models.values():
        for key in ("total_params", "active_params", "flops_per_token", "tokens_per_s",
                    "peak_memory_bytes", "val_loss", "load_cv", "dropped_fraction", "loss_spikes"):
            assert key in m
        _finite_numbers({k: v for k, v in m.items() if v is not None})
        # numbers agree with the run folder
        summary = json.loads((Path(m["run_dir"]) / "summary.json").read_text())
        assert m["val_loss"] == summary["val_loss"] and m["total_params"] == summary["total_params"]
        assert m["tokens"] >= 3000
    d, moe, hyb = models["dense"], models["moe"], models["hybrid"]
    assert d["active_params"] == d["total_params"] and d["load_cv"] is None
    assert moe["total_params"] > moe["active_params"] and hyb["total_params"] > hyb["active_params"]
    actives = [d["active_params"], moe["active_params"], hyb["active_params"]]
    assert max(actives) / min(actives) < 1.05
    assert moe["kind"] == "moe" and hyb["kind"] == "hybrid" and len(hyb["moe_layers"]) == 1
    # every model has a loss at the shared wall-clock point, the shortest run included
    assert all(m["val_loss_at_equal_time"] is not None for m in models.values())
    assert all(m["val_loss_at_equal_tokens"] is not None for m in models.values())
    report = (out / "report.md").read_text()
    assert "What this run shows" in report and "![val_loss_vs_tokens.png]" in report
    # every model's run folder is a normal run
    assert main(["eval", models["moe"]["run_dir"], "--json"]) == 0
    capsys.readouterr()

    # resume: finished models are kept, an unfinished one is trained
    (Path(hyb["run_dir"]) / "summary.json").unlink()
    mtime = (Path(d["run_dir"]) / "summary.json").stat().st_mtime
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "dense: finished earlier, skipped" in printed and "moe: finished earlier, skipped" in printed
    assert (Path(d["run_dir"]) / "summary.json").stat().st_mtime == mtime
    assert (Path(hyb["run_dir"]) / "summary.json").is_file()


def test_bad_compare_input_is_named(tmp_path, capsys):
    assert main(["compare", "--budget", "ten minutes", "--out", str(tmp_path / "a")]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["compare", "--models", "dense,mixtrel", "--out", str(tmp_path / "b")]) == 2
    assert "mixtral" in capsys.readouterr().err
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert not (tmp_path / "a").exists()


def test_budget_parsing_and_helpers():
    assert parse_budget("10m").seconds == 600 and parse_budget("90s").seconds == 90
    assert parse_budget("2M").tokens == 2_000_000 and parse_budget("500k").tokens == 500_000
    assert parse_budget("12345").tokens == 12345
    assert count_spikes([1.0] * 20 + [1.3] + [1.0] * 5) == 1
    assert count_spikes([1.0] * 20 + [1.2]) == 0
    assert interpolate([0, 10], [4.0, 2.0], 5) == pytest.approx(3.0)
    assert interpolate([0, 10], [4.0, 2.0], 11) is None
    assert interpolate([0, 4.373568235003404], [4.0, 2.0], 4.374) is None
    assert interpolate([0, 4.373568235], [4.0, 2.0], 4.3735682351) == 2.0   # JSON round-off
