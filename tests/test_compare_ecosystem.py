"""`moelab compare` in a pipe: the data preamble once, a progress line for every phase after
training (scoring, inspection, inference timing, report and plots), every unit a run of one MLflow
experiment, and --log-file holding all of it."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_compare_preamble_once_progress_and_one_experiment(tmp_path):
    env = dict(os.environ, MOELAB_CACHE=str(tmp_path / "cache"), MLFLOW_ALLOW_FILE_STORE="true",
               MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri())
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3}) + "\n"
                              for i in range(600)))
    sets = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
            "model.ffn_hidden=64", "model.moe.expert_hidden=32", "model.moe.num_experts=4",
            "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=2", f"data.corpus={corpus}",
            "train.trackers=mlflow", "data.val_fraction=0.2"]
    cmd = [sys.executable, "-m", "moelab", "compare", "--models", "dense,moe", "--budget", "1k", "--seeds", "1",
           "--out", str(tmp_path / "cmp"), "--log-file", str(tmp_path / "cmp.log"), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count("data: corpus") == 1, text                  # two units, one preamble
    # announced phases, and the progress line of the one that always runs for seconds (12 timed
    # inference rounds); quicker phases print a line only when they pass 2 s
    assert "scoring 2 trained model(s)" in text and "measuring inference of 2 trained model(s)" in text
    assert "compare: timing inference" in text
    log = (tmp_path / "cmp.log").read_text()
    assert "data: corpus" in log and "compare: timing inference" in log and "done: " in log

    from mlflow.tracking import MlflowClient
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("moelab-cmp")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["dense-s1337-1k", "moe-s1337-1k"]
    assert all(r.info.status == "FINISHED" and "train/loss" in r.data.metrics for r in runs)
