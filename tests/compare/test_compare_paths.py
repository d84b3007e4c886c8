"""compare.json keeps unit folders relative to the compare folder (issue 25, item 6): an entry that
resolves outside the folder is refused, a copied compare folder reports its own runs, and
``--resume`` works from any working directory."""

import json
import shutil

import pytest

from moelab.cli import main
from moelab.compare.plan import PLAN_FILE, build_plan, load_plan, parse_budget, unit_dir, write_plan
from moelab.config import ConfigError

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=64", "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32",
        "train.eval_batches=2", "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _set(overrides):
    return sum((["--set", s] for s in overrides), [])


def _plan(out_dir):
    return build_plan(["dense"], [parse_budget("1k")], ["1k"], 1, "active", TINY, out_dir, "test")


def test_the_plan_stores_unit_folders_relative_to_the_compare_folder(tmp_path):
    plan = _plan(tmp_path / "cmp")
    assert [u["run_dir"] for u in plan["units"]] == [f"runs/{u['id']}" for u in plan["units"]]
    assert unit_dir(tmp_path / "cmp", plan["units"][0]) == (tmp_path / "cmp" / "runs" / "dense-s1337-1k").resolve()


@pytest.mark.parametrize("bad", ["../outside", "runs/../../outside", "/tmp/moelab-outside-abs", "", "."])
def test_an_entry_outside_the_compare_folder_is_refused_before_anything_runs(tmp_path, capsys, bad):
    out = tmp_path / "cmp"
    plan = _plan(out)
    plan["units"][0]["run_dir"] = bad
    write_plan(plan, out)
    with pytest.raises(ConfigError, match="run_dir"):
        load_plan(out)
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run_dir" in err and "Traceback" not in err
    assert not (tmp_path / "outside").exists() and not (out / "runs").exists()


def test_a_symlink_that_leads_outside_is_refused(tmp_path):
    out = tmp_path / "cmp"
    plan = _plan(out)
    write_plan(plan, out)
    (tmp_path / "elsewhere").mkdir()
    (out / "runs").mkdir()
    (out / "runs" / plan["units"][0]["id"]).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside the compare folder"):
        load_plan(out)


def test_a_version_2_plan_reads_its_units_from_this_folder(tmp_path):
    out = tmp_path / "cmp"
    plan = _plan(out)
    plan["version"] = 2
    for u in plan["units"]:
        u["run_dir"] = f"/somewhere/else/cmp/runs/{u['id']}"    # as version 2 stored it
    write_plan(plan, out)
    assert [u["run_dir"] for u in load_plan(out)["units"]] == [f"runs/{u['id']}" for u in plan["units"]]


@pytest.mark.slow          # trains a compare (a subprocess per unit)
def test_resume_from_another_directory_and_a_copied_folder_reports_its_own_runs(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    assert main(["compare", "--models", "dense", "--seeds", "1", "--budget", "1k", "--out", "cmp",
                 "--no-progress", *_set(TINY)]) == 0
    original = first / "cmp"
    stored = json.loads((original / PLAN_FILE).read_text())
    assert all(u["run_dir"] == f"runs/{u['id']}" for u in stored["units"])

    # --resume from another working directory finds the finished units: nothing is retrained
    monkeypatch.chdir(second)
    capsys.readouterr()
    assert main(["compare", "--resume", str(original), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "finished earlier, skipped" in printed and ": training" not in printed
    assert not (second / "cmp").exists()

    # a copy, with the original moved away, reads and reports its own run folders
    copy = tmp_path / "c" / "copy"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns(".lock"))
    original.rename(first / "moved-away")
    unit = stored["units"][0]
    summary_path = copy / unit["run_dir"] / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["val_loss"] = 9.875
    summary_path.write_text(json.dumps(summary))
    assert main(["compare", "--resume", str(copy), "--no-progress"]) == 0
    results = json.loads((copy / "results.json").read_text())
    assert results["models"][0]["val_loss"] == 9.875
    assert results["models"][0]["run_dirs"] == [unit["run_dir"]]
    assert not (first / "cmp").exists()
