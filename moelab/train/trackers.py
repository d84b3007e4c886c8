"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (``train.trackers``).

Every record the run logger appends to metrics.jsonl reaches every tracker as flat scalars, under
the same names in each (``train/loss``, ``train/grad_norm``, ``val/loss``,
``router/layer3/load_cv``, ``comm/alltoall_bytes`` ...); the config goes in as the run's parameters
at the start, the summary at the end. Names come from ``train.run_name`` (default: the run folder's
name) and from each library's own variables, which the libraries read themselves: ``WANDB_PROJECT``,
``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_MODE``, ``WANDB_DIR``; ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``. wandb and mlflow are optional (``pip install
'moelab[trackers]'``) and imported only when a run names them. A resumed run continues the same
tracker runs: their ids are kept in ``RUN/trackers.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from moelab.config import ConfigError

TRACKERS_FILE = "trackers.json"
EXTRA = "trackers"
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}      # tracker -> the package it needs
# metrics.jsonl eval-record keys -> tracker names (the TensorBoard tags moelab has always used)
EVAL_NAMES = {"val_loss": "val/loss", "val_ppl": "val/perplexity", "mlm_accuracy": "val/mlm_accuracy",
              "mlm_loss": "val/mlm_loss"}
DEFAULT_PROJECT = "moelab"           # wandb project / MLflow experiment when no variable names one


def check_available(trackers) -> None:
    """Refuse, before any work, a tracker whose package is not installed (naming the extra)."""
    for name in trackers:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.trackers includes {name!r}, but the {package} package is not "
                              f"installed: pip install 'moelab[{EXTRA}]' (or pip install {package})")


def scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, flat, under tracker names: every number in it,
    each MoE layer's router statistics and each communication counter (max over ranks, and per
    rank when there are several)."""
    out: dict[str, float] = {}
    kind = record.get("kind")
    for key, value in record.items():
        if key in ("kind", "step", "router", "comm"):
            continue
        if kind == "eval":
            if key in ("tokens", "elapsed_s"):          # the train record carries these
                continue
            name = EVAL_NAMES.get(key, f"val/{key}")
        else:
            name = f"{kind}/{key}"
        if _is_number(value):
            out[name] = float(value)
    for layer in record.get("router") or []:
        for key, value in layer.items():
            if key != "layer" and _is_number(value):
                out[f"router/layer{layer['layer']}/{key}"] = float(value)
    for key, per_rank in (record.get("comm") or {}).items():
        values = [float(v) for v in per_rank if _is_number(v)] if isinstance(per_rank, list) else []
        if values:
            out[f"comm/{key}"] = max(values)
            if len(values) > 1:
                out.update({f"comm/{key}/rank{r}": v for r, v in enumerate(values)})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))         # bools count: skipped = 1.0


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"model.moe.top_k": "2", ...}``: a nested config as run parameters."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def group_env(name: str) -> dict[str, str]:
    """Variables that put every training run started with them in one wandb group and one MLflow
    experiment called ``name`` (what ``moelab compare`` sets for its units), unless the user's
    environment already names them."""
    env = {}
    if not os.environ.get("WANDB_RUN_GROUP"):
        env["WANDB_RUN_GROUP"] = name
    if not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
        env["MLFLOW_EXPERIMENT_NAME"] = name
    return env


# ---------------------------------------------------------------------------------------------
# the trackers
# ---------------------------------------------------------------------------------------------

class TensorBoardTracker:
    """Event files in ``RUN/tb`` (what `tensorboard --logdir RUN` shows)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, run_name: str, ids: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tb"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: Optional[dict]) -> None:
        if summary is not None:
            self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```")
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run: project from ``WANDB_PROJECT`` (else "moelab"), group from
    ``WANDB_RUN_GROUP``, offline with ``WANDB_MODE=offline``; files under ``RUN/wandb`` unless
    ``WANDB_DIR`` says otherwise."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, run_name: str, ids: dict):
        import wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name, config=config,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir), id=ids.get("id"),
            resume="allow", settings=wandb.Settings(console="off"))
        ids["id"] = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: Optional[dict]) -> None:
        if summary is not None:
            self.run.summary.update({f"summary/{k}": v for k, v in summary.items() if _is_number(v)})
            self.run.config.update({"summary": summary}, allow_val_change=True)
        self.run.finish()


class MLflowTracker:
    """An MLflow run in the experiment ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME`` (else
    "moelab") of the store ``MLFLOW_TRACKING_URI``; metrics and parameters go in batches. The
    config is the run's parameters; the summary its ``summary/*`` metrics and ``summary.*`` tags."""

    name = "mlflow"
    MAX_METRICS, MAX_PARAMS = 1000, 100            # MLflow's limits per log_batch call

    def __init__(self, run_dir: Path, config: dict, run_name: str, ids: dict):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()
        run_id = ids.get("run_id")
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(self._experiment_id(), run_name=run_name).info.run_id
            self._params(flat_params(config))
        ids["run_id"] = self.run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException: not in this store (another URI)
            return False

    def _experiment_id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - created meanwhile by another unit of a compare
            return self.client.get_experiment_by_name(name).experiment_id

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), self.MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + self.MAX_PARAMS])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), self.MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + self.MAX_METRICS])

    def finish(self, summary: Optional[dict]) -> None:
        if summary is not None:
            numbers = {f"summary/{k}": float(v) for k, v in summary.items()
                       if _is_number(v) and math.isfinite(float(v))}
            self.log(numbers, step=int(summary.get("steps", 0)))
            # tags, not params: a resumed run writes a new summary, and MLflow params never change
            from mlflow.entities import RunTag
            self.client.log_batch(self.run_id, tags=[RunTag(f"summary.{k}", json.dumps(v)[:5000])
                                                     for k, v in summary.items()])
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "KILLED")


TRACKERS = {t.name: t for t in (TensorBoardTracker, WandbTracker, MLflowTracker)}


def open_trackers(names, run_dir: Path, config: dict, run_name: Optional[str]) -> list:
    """Start (or, with ids in RUN/trackers.json, continue) each named tracker."""
    from moelab.fileio import write_text_atomic
    check_available(names)
    path = run_dir / TRACKERS_FILE
    try:
        ids = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        ids = {}
    if not isinstance(ids, dict):                   # a damaged file: start new tracker runs
        ids = {}
    opened = []
    try:
        for name in names:
            if not isinstance(ids.get(name), dict):
                ids[name] = {}
            own = ids[name]
            opened.append(TRACKERS[name](run_dir, config, run_name or run_dir.resolve().name, own))
    except BaseException:
        for tracker in opened:                 # no half-open set: close what did start
            tracker.finish(None)
        raise
    ids = {k: v for k, v in ids.items() if v}
    if ids:
        write_text_atomic(path, json.dumps(ids, indent=2) + "\n")
    return opened
