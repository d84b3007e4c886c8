"""`moelab search` end to end with tiny trials (real training processes, real Optuna storage):
a 3-trial search with its retrain and report; killed after its first trial and resumed; two
processes on one SQLite study; trials pruned at their evaluations. Each test trains several
processes: all are slow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from moelab.accounting import param_counts
from moelab.cli import build_parser, main
from moelab.compare import stats
from moelab.search.study import counts_toward
from moelab.runfolder import checkpoint_dirs, read_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32",
        "train.eval_batches=2", "data.max_bytes=1500000", "data.val_fraction=0.1"]
TRIAL_FIELDS = ("number", "state", "moe_layers", "experts_per_layer", "active_params", "total_params",
                "tokens_per_s", "val_loss")


def _set(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:      # one tokenizer and token cache for every run here
        mp.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))
        mp.setenv("PYTHONPATH", str(ROOT))
        yield


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _counted(res: dict) -> list[dict]:
    """The trials that count toward --trials (a repeat of a trained model reuses its result)."""
    return [r for r in res["trials"] if r["duplicate_of"] is None]


def _launches(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("$ moelab train")]


@pytest.fixture(scope="module")
def search3(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    rc = main(["search", "--trials", "3", "--budget-per-trial", "2k", "--retrain-seeds", "2",
               "--out", str(out), *_set(TINY)])
    assert rc == 0
    return out, _results(out)


def test_three_trials_complete_within_two_percent_of_the_budget(search3):
    out, res = search3
    assert len(_counted(res)) == 3 and not res["running"] and not res["failed"]
    target = res["target_active_params"]
    for r in res["trials"]:
        assert all(k in r for k in TRIAL_FIELDS) and r["state"] in ("complete", "pruned")
        assert abs(r["active_params"] / target - 1) <= 0.02
        assert (r["val_loss"] is None) == (r["state"] == "pruned")
        assert len(r["experts_per_layer"]) == len(r["moe_layers"])
        for rel in r["run_dirs"]:               # the trained model itself, read from its run folder
            assert not Path(rel).is_absolute()  # stored relative to the search folder
            run_dir = out / rel
            cfg = read_config(run_dir)
            assert abs(param_counts(cfg.model)["active"] / target - 1) <= 0.02
            assert cfg.model.moe_layer_indices() == r["moe_layers"]
            if r["state"] == "complete":        # finished: the final checkpoint only, and its weights
                ckpts = checkpoint_dirs(run_dir)
                assert [c.name for c in ckpts] == [f"ckpt-{res['steps_per_run']:08d}"]
                assert (Path(run_dir) / "model.safetensors").is_file()
                summary = json.loads((Path(run_dir) / "summary.json").read_text())
                assert r["val_loss"] == pytest.approx(summary["val_loss"])


def test_report_retrain_and_verdicts(search3):
    out, res = search3
    text = (out / "report.md").read_text()
    for section in ("## Trials", "## Best pattern retrained", "## What this search shows", "## Parameter importances"):
        assert section in text
    for name in res["figures"]:
        assert (out / name).is_file()
    assert {"patterns.png", "pareto_total_params.png", "pareto_tokens_per_s.png", "retrain.png"} <= set(res["figures"])
    best = res["best"]
    complete = [r for r in res["trials"] if r["state"] == "complete"]
    assert best["number"] == min(complete, key=lambda r: r["val_loss"])["number"]
    assert all(k in best for k in TRIAL_FIELDS) and len(best["val_loss_seeds"]) == 2
    rt = res["retrain"]
    assert rt["seeds"] == [1338, 1339] and (out / "retrain" / "report.md").is_file()
    pats = {p["name"]: p for p in rt["patterns"]}
    assert "best" in pats and best["val_loss_seeds"] == pats["best"]["val_loss_seeds"]
    named = set(pats) | {a for p in rt["patterns"] for a in p["also"]}
    assert {"all-dense", "all-moe", "every-other", "first-half", "last-half", "pyramid"} <= named
    for p in rt["patterns"]:
        assert abs(p["active_params"] / res["target_active_params"] - 1) <= 0.02
    for v in rt["verdicts"]:
        if v["verdict"] == "same model":
            continue
        gaps = [b - o for b, o in zip(pats["best"]["val_loss_seeds"], pats[v["against"]]["val_loss_seeds"])]
        assert v["paired_gaps"] == pytest.approx(gaps)
        assert v["verdict"] == stats.judge(gaps, "seeds").verdict
    assert any("fixed pattern" in line for line in res["findings"])


def test_killed_after_the_first_trial_resumes_without_retraining(tmp_path):
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "search", "--trials", "3", "--budget-per-trial",
                             "2k", "--retrain-seeds", "0", "--out", str(out), *_set(TINY)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "trials" / "trial-0000-s1337" / "summary.json"
    deadline = time.monotonic() + 600
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    assert not (out / "results.json").exists()            # it died before finishing the study
    assert main(["search", "--resume", str(out)]) == 0
    res = _results(out)
    assert len(_counted(res)) == 3 and not res["running"]
    assert first.stat().st_mtime_ns == stamp               # trial 0 was not trained again
    assert len(_launches(out / "logs" / "trial-0000-s1337.log")) == 1


def test_two_processes_share_one_sqlite_study(tmp_path):
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "moelab", "search", "--trials", "4", "--budget-per-trial", "2k",
                               "--retrain-seeds", "0", "--storage", db, "--study", "shared", "--out", str(o),
                               *_set(TINY)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=db)
    trials = study.get_trials()
    counted = [t for t in trials if counts_toward(t)]
    assert len(counted) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in counted)
    for t in trials:                      # the others: repeats of a trained model, or asked too late
        assert t in counted or t.user_attrs.get("result", {}).get("duplicate_of") is not None \
            or t.user_attrs["fail_reason"].startswith("beyond --trials")
    workers = {t.user_attrs["worker"]["out_dir"] for t in counted}
    assert workers == {str(o.resolve()) for o in outs}                         # both contributed
    for t in trials:
        folders = [o / "trials" / f"trial-{t.number:04d}-s1337" for o in outs]
        trained = [f for f in folders if f.is_dir()]
        if t in counted:
            assert len(trained) == 1, (t.number, trained)                      # trained by exactly one
            log = trained[0].parent.parent / "logs" / f"trial-{t.number:04d}-s1337.log"
            assert len(_launches(log)) == 1
        else:
            assert not trained
    final = [_results(o) for o in outs if not _results(o)["running"]]
    assert final and len(_counted(final[0])) == 4


def test_pruned_trials_appear_pruned_with_the_step_they_stopped_at(tmp_path):
    from moelab.commands.search import new_settings
    from moelab.search.driver import run_search
    from moelab.search.study import write_settings
    args = build_parser().parse_args(["search", "--trials", "2", "--budget-per-trial", "12k", "--retrain-seeds", "0",
                                      "--out", str(tmp_path / "s"), *_set(TINY)])
    settings, out = new_settings(args)
    write_settings(settings, out)
    # every reported loss is above 0: each trial is pruned at its first reported evaluation
    assert run_search(settings, out, pruner=optuna.pruners.ThresholdPruner(upper=0.0), log=lambda _m: None) == 0
    res = _results(out)
    steps = res["steps_per_run"]
    assert len(res["trials"]) == 2 and res["best"] is None
    for r in res["trials"]:
        assert r["state"] == "pruned" and r["val_loss"] is None
        (rel,) = r["run_dirs"]
        run_dir = out / rel
        logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert r["pruned_at_step"] == max(rec["step"] for rec in logged) == r["steps"]
        assert 0 < r["pruned_at_step"] < steps                     # stopped early, by SIGTERM
        assert not (Path(run_dir) / "summary.json").exists() and not checkpoint_dirs(run_dir)
        assert f"pruned at step {r['pruned_at_step']}" in (out / "report.md").read_text()
    study = optuna.load_study(study_name="moelab-search", storage=f"sqlite:///{out.resolve() / 'search.db'}")
    for t in study.get_trials():
        assert t.state.name == "PRUNED" and min(t.intermediate_values) <= t.user_attrs["result"]["pruned_at_step"]


def test_loss_at_time_scores_each_trial_at_the_base_models_time(tmp_path):
    from moelab.search.objective import score_at_time
    out = tmp_path / "s"
    assert main(["search", "--trials", "2", "--budget-per-trial", "2k", "--retrain-seeds", "0", "--objective",
                 "loss_at_time", "--pruner", "none", "--out", str(out), *_set(TINY)]) == 0
    res = _results(out)
    ref = json.loads((out / "reference-speed" / "summary.json").read_text())["tokens_per_s"]
    assert res["reference_tokens_per_s"] == pytest.approx(ref)
    for r in res["trials"]:
        if r["duplicate_of"] is not None:
            continue
        (rel,) = r["run_dirs"]
        run_dir = out / rel
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        evals = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e["kind"] == "eval"]
        expected = score_at_time(evals, summary["tokens_per_s"], ref, res["budget_tokens"])
        assert r["value"] == pytest.approx(expected) and r["val_loss_at_time"] == pytest.approx(expected)
