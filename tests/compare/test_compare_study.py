"""`moelab compare` end to end on one tiny study (2 models x 2 seeds x 2 budgets = 8 real training
runs, shared by every test here through a module fixture; ~1 minute on 2 idle cores, almost all
of it the 8 training processes starting up), then the parts a study at this size cannot reach
(fits, one-seed verdicts, the scaling figures) on its real runs or on synthetic numbers."""

import json
import math
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.compare import stats
from moelab.compare.analysis import ModelSummary, Study, compare, count_spikes, interpolate
from moelab.compare.findings import noise_lines
from moelab.compare.plan import load_plan, parse_budget, parse_budgets, parse_seeds
from moelab.compare.plots import scaling_plots

pytestmark = pytest.mark.slow      # the module's study trains a whole compare

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.max_seq_len=64",
        "train.batch_size=4", "train.seq_len=32", "train.eval_batches=4",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]
MODELS, SEEDS, BUDGETS = ("dense", "hybrid"), (1337, 1338), ("1k", "2k")


def _set(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))
        out = tmp_path_factory.mktemp("compare") / "cmp"
        rc = main(["compare", "--models", ",".join(MODELS), "--seeds", "2", "--budgets", ",".join(BUDGETS),
                   "--out", str(out), "--no-progress", *_set(TINY)])
        assert rc == 0
        yield out, json.loads((out / "results.json").read_text())


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def test_results_hold_mean_sd_and_seeds_equal_to_the_run_folders(study):
    out, results = study
    assert results["seeds"] == list(SEEDS) and results["budget"] == "2k"
    models = {m["name"]: m for m in results["models"]}
    assert list(models) == list(MODELS)
    for m in models.values():
        assert m["seeds"] == list(SEEDS) and len(m["run_dirs"]) == 2
        summaries = [_summary(d) for d in m["run_dirs"]]
        for key in ("val_loss", "tokens_per_s", "train_time_s", "total_params"):
            per_seed = [s[key] for s in summaries]
            assert m[f"{key}_seeds"] == per_seed
            assert m[key] == pytest.approx(sum(per_seed) / 2)
            assert m[f"{key}_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
        assert m["val_loss_sd"] > 0                     # two seeds really trained differently
        assert m["val_loss_batch_se"] > 0
        # compare re-scored the trainer's own validation batches: same mean as the logged loss
        assert m["val_loss_rescored_seeds"] == pytest.approx(m["val_loss_seeds"], abs=1e-5)
        assert all(s["tokens"] >= 2000 for s in summaries)
    assert models["dense"]["kind"] == "dense" and models["hybrid"]["kind"] == "hybrid"
    assert models["hybrid"]["total_params"] > models["hybrid"]["active_params"]
    assert models["hybrid"]["active_params"] / models["dense"]["active_params"] == pytest.approx(1, abs=0.05)


def test_verdicts_follow_the_stated_rule(study):
    out, results = study
    assert results["noise"]["basis"] == "seeds" and results["noise"]["t"] == pytest.approx(12.706, abs=1e-3)
    comps = [c for c in results["comparisons"] if c["measure"] == "val_loss"]
    assert {(c["model"], c["budget"]) for c in comps} == {("hybrid", b) for b in BUDGETS}
    models = {m["name"]: m for m in results["models"]}
    for c in comps:
        assert c["reference"] == "dense" and c["basis"] == "seeds" and len(c["paired_gaps"]) == 2
        again = stats.judge(c["paired_gaps"], "seeds")
        assert c["verdict"] == again.verdict and c["threshold"] == pytest.approx(again.threshold)
        if c["budget"] == "2k":
            gaps = [h - d for h, d in zip(models["hybrid"]["val_loss_seeds"], models["dense"]["val_loss_seeds"])]
            assert c["paired_gaps"] == pytest.approx(gaps)
    headline = next(c for c in comps if c["budget"] == "2k")
    findings = " ".join(results["findings"])
    assert f"{headline['gap']:+.4f}" in findings and headline["verdict"] in findings
    report = (out / "report.md").read_text()
    assert "What this run shows" in report and "t(1)" in report and "Inference" in report


def test_inference_numbers_are_finite_and_positive(study):
    _, results = study
    for m in results["models"]:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8",
                    "kv_cache_bytes_per_token", "weight_bytes_per_token_batch1", "weight_bytes_per_token_batch8"):
            assert len(m[f"{key}_seeds"]) == 2
            for v in m[f"{key}_seeds"]:
                assert math.isfinite(v) and v > 0, (m["name"], key, v)
        # 2 layers x (K and V) x 2 heads x 32 dims x 4 bytes (float32)
        assert m["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    dense, hybrid = results["models"]
    assert hybrid["experts_touched_batch8"][0] > 2        # 8 tokens reach more than one token's top-2
    assert hybrid["weight_bytes_per_token_batch8"] < hybrid["weight_bytes_per_token_batch1"]


def test_scaling_section_and_figures(study):
    out, results = study
    s = results["scaling"]
    assert s["budgets"] == [1000, 2000] and set(s["crossover_tokens"]) == {"hybrid"}
    for m in s["models"].values():
        assert len(m["val_loss"]) == 2 and m["fit"] is None      # three budgets are needed for a fit
    runs = load_plan(out)["units"]
    for i, budget in enumerate(BUDGETS):
        losses = [_summary(u["run_dir"])["val_loss"] for u in runs if u["model"] == "dense" and u["budget"] == budget]
        assert s["models"]["dense"]["val_loss"][i] == pytest.approx(sum(losses) / 2)
        assert s["models"]["dense"]["val_loss_seeds"][i] == losses
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "gap_vs_tokens.png", "gap_vs_time.png",
                 "scaling_vs_tokens.png", "scaling_vs_flops.png", "throughput_memory.png",
                 "inference.png", "expert_load_hybrid.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in results["figures"]


def test_one_seed_reports_no_noise_estimate_and_judges_against_validation_batches(study):
    out, _ = study
    from moelab.compare.analysis import read_study
    full = read_study(load_plan(out), out)
    rows = {m.name: ModelSummary(m.name, m.budget, m.runs[:1]) for m in full.at()}
    c = compare(rows["hybrid"], rows["dense"])
    assert c.verdict.basis == "validation batches" and c.verdict.n == 4     # train.eval_batches
    assert c.verdict.gap == pytest.approx(rows["hybrid"].mean("val_loss") - rows["dense"].mean("val_loss"), abs=1e-4)
    one = Study([SEEDS[0]], ["2k"], list(MODELS), {"2k": rows}, "dense", {})
    text = " ".join(noise_lines(one, [c]))
    assert "no estimate of seed-to-seed noise" in text and "standard error" in text


def test_scaling_figures_with_fits_and_a_crossover(tmp_path):
    b = [1e5, 3e5, 1e6]
    fit = {"E": 2.0, "A": 20.0, "alpha": 0.3, "rmse": 0.0}
    models = {name: {"val_loss": [fit["E"] + fit["A"] * x ** -0.3 + off for x in b], "val_loss_sd": [0.01] * 3,
                     "tokens": b, "train_flops": [3 * 1e7 * x for x in b], "fit": dict(fit, E=2.0 + off)}
              for name, off in (("dense", 0.0), ("moe", -0.02))}
    paths = scaling_plots({"budgets": b, "models": models, "crossover_tokens": {"moe": 2e5}}, tmp_path)
    assert [p.name for p in paths] == ["scaling_vs_tokens.png", "scaling_vs_flops.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_resume_skips_finished_units(study, capsys):
    out, _ = study
    plan = load_plan(out)
    victim = next(u for u in plan["units"] if u["id"] == "hybrid-s1338-2k")
    (Path(victim["run_dir"]) / "summary.json").unlink()
    kept = {u["id"]: (Path(u["run_dir"]) / "summary.json").stat().st_mtime_ns
            for u in plan["units"] if u is not victim}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE", str(out.parent.parent / "moelab-cache"))
        assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == len(plan["units"]) - 1
    assert "hybrid-s1338-2k: resuming" in printed or "hybrid-s1338-2k: training" in printed
    for u in plan["units"]:
        if u is not victim:
            assert (Path(u["run_dir"]) / "summary.json").stat().st_mtime_ns == kept[u["id"]]
    assert (Path(victim["run_dir"]) / "summary.json").is_file()


def test_bad_compare_input_is_named(tmp_path, capsys):
    cases = [(["--budget", "ten minutes"], "--budget"), (["--models", "dense,mixtrel"], "mixtral"),
             (["--budgets", "1k"], "--budgets"), (["--budgets", "1k,2m"], "token counts"),
             (["--budget", "1k", "--budgets", "1k,2k"], "not both"), (["--seeds", "0"], "--seeds"),
             (["--seeds", "1,1"], "repeats")]
    for args, needle in cases:
        assert main(["compare", *args, "--out", str(tmp_path / "a")]) == 2, args
        assert needle in capsys.readouterr().err, args
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert main(["compare", "--resume", str(tmp_path), "--seeds", "5"]) == 2
    assert "drop --seeds" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_budget_seed_parsing_and_helpers():
    assert parse_budget("10m").seconds == 600 and parse_budget("90s").seconds == 90
    assert parse_budget("2M").tokens == 2_000_000 and parse_budget("500k").label == "500k"
    assert parse_budget("1.5M").label == "1.5M" and parse_budget("12345").label == "12345"
    assert [b.tokens for b in parse_budgets("1M,250k,500k")] == [250_000, 500_000, 1_000_000]
    assert parse_seeds("3", 1337) == [1337, 1338, 1339] and parse_seeds("5,1", 0) == [5, 1]
    assert count_spikes([1.0] * 20 + [1.3] + [1.0] * 5) == 1
    assert count_spikes([1.0] * 20 + [1.2]) == 0
    assert interpolate([0, 10], [4.0, 2.0], 5) == pytest.approx(3.0)
    assert interpolate([0, 10], [4.0, 2.0], 11) is None
    assert interpolate([0, 4.373568235], [4.0, 2.0], 4.3735682351) == 2.0   # JSON round-off


def test_report_embeds_the_inspect_summary_of_each_sparse_model(study):
    out, results = study
    assert set(results["inspect"]) == {"hybrid"}                 # dense routes nothing
    s = results["inspect"]["hybrid"]
    assert s["moe_layers"] == 1 and s["tokens"] > 0 and s["max_normalized_load"] >= 1.0
    assert "## Routing" in (out / "report.md").read_text()
