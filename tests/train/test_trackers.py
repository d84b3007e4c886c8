"""train.trackers: every scalar metrics.jsonl gets reaches TensorBoard, wandb (offline) and MLflow
(local file store), read back from what each library wrote; config and summary as run
parameters; names from train.run_name and the libraries' own variables; a resumed run continues
the same tracker runs; a missing package exits 2 naming the extra."""

from __future__ import annotations

import json
import math
import sys

import pytest

import moelab
from moelab.cli import main
from moelab.train.trackers import TRACKERS_FILE, scalars
from moelab.runfolder import load_metrics
from moelab.train.trainer import train

from wandb_records import history, run_info, summary

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.ffn_hidden=64", "model.moe.expert_hidden=32", "model.moe.num_experts=4",
        "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1",
        "train.log_every=2", "train.eval_every=3", "train.warmup_steps=1", "train.save_every=3",
        "train.save_every_minutes=none"]


def test_scalars_flatten_every_number_of_a_record():
    record = {"kind": "train", "step": 4, "tokens": 256, "loss": 2.5, "aux_loss": 0.01, "lr": 1e-3,
              "grad_norm": 0.7, "tokens_per_s": 900.0, "elapsed_s": 1.5, "skipped": True,
              "router": [{"layer": 1, "load_cv": 0.2, "max_over_mean": 1.4, "dropped_fraction": 0.0,
                          "entropy": 1.2, "aux": 0.9, "load": [0.5, 0.5]}],
              "comm": {"alltoall_bytes": [10, 30], "alltoall_s": [0.1, 0.2]}}
    values = scalars(record)
    assert values["train/loss"] == 2.5 and values["train/grad_norm"] == 0.7 and values["train/skipped"] == 1.0
    assert values["router/layer1/load_cv"] == 0.2 and values["router/layer1/aux"] == 0.9
    assert values["comm/alltoall_bytes"] == 30 and values["comm/alltoall_bytes/rank0"] == 10
    assert not any(k.endswith("/load") or k.endswith("/step") for k in values)
    ev = scalars({"kind": "eval", "step": 4, "tokens": 256, "elapsed_s": 1.0, "val_loss": 2.0,
                  "val_ppl": math.exp(2.0), "mlm_accuracy": 0.3})
    assert ev == {"val/loss": 2.0, "val/perplexity": math.exp(2.0), "val/mlm_accuracy": 0.3}


def test_a_missing_package_exits_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)            # how Python marks a module absent
    argv = ["train", "--preset", "moe", "--out", str(tmp_path / "run"), "--set", "train.trackers=tensorboard,mlflow"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlflow" in err and "moelab[trackers]" in err
    assert not (tmp_path / "run").exists()


def test_compare_groups_its_units_unless_the_user_named_a_group(monkeypatch):
    from moelab.train.trackers import group_env
    for name in ("WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert group_env("moelab-cmp") == {"WANDB_RUN_GROUP": "moelab-cmp", "MLFLOW_EXPERIMENT_NAME": "moelab-cmp"}
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")
    assert group_env("moelab-cmp") == {}


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_every_scalar_reaches_every_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "moe-study")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-1")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "routing")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                              for i in range(400)))
    run = tmp_path / "run"
    sets = TINY + [f"data.corpus={corpus}", "train.trackers=tensorboard,wandb,mlflow", "train.run_name=mx-tiny"]
    cfg = moelab.resolve_config("moe", sets + ["train.max_steps=3"])
    train(cfg, run, show_progress=False, log=lambda m: None)
    ids = json.loads((run / TRACKERS_FILE).read_text())
    train(moelab.resolve_config("moe", sets + ["train.max_steps=6"]), run, resume=True, show_progress=False,
          log=lambda m: None)
    assert json.loads((run / TRACKERS_FILE).read_text()) == ids          # the same runs, continued

    records = load_metrics(run)
    expected = {}                                   # (name, step) -> value, from metrics.jsonl
    for r in records:
        expected.update({(k, r["step"]): v for k, v in scalars(r).items()})
    names = {k for k, _ in expected}
    assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss",
            "router/layer0/load_cv", "router/layer1/max_over_mean", "router/layer1/dropped_fraction"} <= names
    assert max(s for _, s in expected) == 6

    tb = _tb_scalars(run / "tb")
    for (name, step), value in expected.items():
        assert tb[name][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)    # float32 events

    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    ml_run = client.get_run(ids["mlflow"]["run_id"])
    assert ml_run.info.run_name == "mx-tiny" and ml_run.info.status == "FINISHED"
    assert client.get_experiment(ml_run.info.experiment_id).name == "routing"
    assert len(client.search_runs([ml_run.info.experiment_id])) == 1
    for name in names:
        logged = {m.step: m.value for m in client.get_metric_history(ml_run.info.run_id, name)}
        for (n, step), value in expected.items():
            if n == name:
                assert logged[step] == pytest.approx(value, rel=1e-12), (name, step)
    params = ml_run.data.params
    assert params["model.moe.num_experts"] == "4" and params["train.run_name"] == "mx-tiny"
    final = json.loads((run / "summary.json").read_text())
    assert ml_run.data.metrics["summary/val_loss"] == pytest.approx(final["val_loss"])

    files = sorted((run / "wandb").glob(f"*run-*-{ids['wandb']['id']}/run-{ids['wandb']['id']}.wandb"))
    assert len(files) == 2                          # the first half and the resumed half
    info = run_info(files[0])
    assert info["name"] == "mx-tiny" and info["project"] == "moe-study" and info["group"] == "sweep-1"
    assert info["config"]["model"]["moe"]["num_experts"] == 4
    # the resumed half is a second file of the same run id; together they hold every value
    logged = {}
    for f in files:
        for row in history(f):
            logged.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    assert any(summary(f).get("summary/val_loss") == pytest.approx(final["val_loss"])
               for f in files)
