"""Plan and run a comparison: every model trains as a normal run folder under DIR/runs/, in its
own process (so peak memory is measured per model), one after another, with the same tokenizer,
data order, seed and budget. ``DIR/compare.json`` records the plan so ``--resume DIR`` can skip
finished models and continue an interrupted one from its last checkpoint."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moelab.config import ConfigError
from moelab.train.checkpoint import write_json
from moelab.train.state import checkpoint_dirs

DEFAULT_MODELS = ("dense", "moe", "hybrid")
DEFAULT_BUDGET = "1M"     # ~9 minutes for the three default models on an idle 2-core CPU
PLAN_FILE = "compare.json"
HUGE_STEPS = 100_000_000


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None
    seconds: float | None = None

    def describe(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens:,} tokens per model"
        return f"{self.seconds:g} s of training per model"


def parse_budget(text: str) -> Budget:
    """'10m' minutes, '90s' seconds, '2M' / '500k' / '123456' tokens."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(m|min|s|sec|h)", t)
    if m:
        value, unit = float(m.group(1)), m.group(2)
        seconds = value * {"m": 60, "min": 60, "s": 1, "sec": 1, "h": 3600}[unit]
        if seconds <= 0:
            raise ConfigError(f"--budget = {text!r} is invalid: must be > 0")
        return Budget(seconds=seconds)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKM]?)", t)
    if m:
        tokens = int(float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6}[m.group(2)])
        if tokens <= 0:
            raise ConfigError(f"--budget = {text!r} is invalid: must be > 0")
        return Budget(tokens=tokens)
    raise ConfigError(f"--budget = {text!r} is invalid: use minutes ('10m'), seconds ('90s') "
                      f"or tokens ('2M', '500k', '123456')")


def model_name(spec: str) -> str:
    return Path(spec).stem if spec.endswith(".toml") else spec


def budget_overrides(budget: Budget, batch_size: int, seq_len: int) -> list[str]:
    """Train keys that make a run follow the compare budget, with evals spread over it."""
    out = [f"train.max_steps={HUGE_STEPS}", "train.log_every=1"]
    if budget.tokens is not None:
        steps = max(1, math.ceil(budget.tokens / (batch_size * seq_len)))
        out += [f"train.max_tokens={budget.tokens}", f"train.eval_every={max(1, steps // 12)}",
                f"train.save_every={max(1, steps // 4)}", f"train.warmup_steps={max(1, min(50, steps // 10))}"]
    else:
        out += [f"train.max_minutes={budget.seconds / 60}", "train.eval_every=25", "train.save_every=100"]
    return out


def load_plan(out_dir: Path) -> dict:
    path = out_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {str(out_dir)!r}: not a compare folder (no {PLAN_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def _model_args(spec: str) -> list[str]:
    return ["--config", spec] if spec.endswith(".toml") else ["--preset", spec]


def plan_compare(models: list[str], budget_text: str, overrides: list[str], out_dir: Path,
                 command: str) -> dict:
    """Validate every model's config (before any training) and write the plan."""
    from moelab import resolve_config
    budget = parse_budget(budget_text)
    names = [model_name(m) for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"--models = {','.join(models)} is invalid: names repeat")
    entries = []
    for spec, name in zip(models, names):
        cfg = resolve_config(spec, overrides)          # raises a named ConfigError on bad input
        extra = budget_overrides(budget, cfg.train.batch_size, cfg.train.seq_len)
        resolve_config(spec, overrides + extra).validate_for_training()
        entries.append({"name": name, "spec": spec, "run_dir": str(out_dir / "runs" / name),
                        "train_args": _model_args(spec) + sum((["--set", o] for o in overrides + extra), [])})
    plan = {"models": entries, "budget": budget_text, "overrides": overrides, "command": command,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PLAN_FILE, plan)
    return plan


def run_compare(plan: dict, out_dir: Path, *, show_progress: bool | None = None,
                log: Callable[[str], None] = print) -> list[Path]:
    """Train every model of the plan that is not finished yet; returns their run folders."""
    runs = []
    n = len(plan["models"])
    for i, entry in enumerate(plan["models"], 1):
        run_dir = Path(entry["run_dir"])
        runs.append(run_dir)
        if (run_dir / "summary.json").is_file():
            log(f"[{i}/{n}] {entry['name']}: finished earlier, skipped")
            continue
        if checkpoint_dirs(run_dir):
            args = ["train", "--resume", str(run_dir)]
            log(f"[{i}/{n}] {entry['name']}: resuming from {checkpoint_dirs(run_dir)[-1].name}")
        else:
            args = ["train", "--out", str(run_dir)] + entry["train_args"]
            log(f"[{i}/{n}] {entry['name']}: training ({entry['spec']})")
        if show_progress is False:
            args.append("--no-progress")
        proc = subprocess.run([sys.executable, "-m", "moelab", *args])
        if proc.returncode != 0:
            raise RuntimeError(f"training {entry['name']} failed (exit {proc.returncode}); "
                               f"fix the cause and run `moelab compare --resume {out_dir}`")
    return runs
