"""What both examples share: parameter counts at matched active size, seed statistics, the
results table and the JSON file. The models and experiments live in their own scripts."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import moelab
from moelab.fileio import write_text_atomic


def require_extra(*modules: str) -> None:
    """Stop with the install command, not an ImportError traceback, when the optional
    dependencies of the examples are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"examples: {', '.join(missing)} is not installed; install the 'examples' extra: "
                 "pip install 'moelab[examples]' (in a checkout: pip install -e '.[examples]')")


def seed_everything(seed: int) -> None:
    """One seed for every generator a run touches (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def moe_layers(model: nn.Module) -> list[moelab.MoE]:
    return [m for m in model.modules() if isinstance(m, moelab.MoE)]


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and the parameters one input (image token / state) actually uses.

    A token visits top_k of an MoE layer's E experts, so (E - top_k) experts' weights per MoE layer
    are inactive for it; the router gate is always active. For a dense model active == total."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
        inactive += (layer.num_experts - layer.cfg.top_k) * per_expert
    return {"total_params": total, "active_params": total - inactive}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) over seeds."""
    if len(values) < 2:
        raise ValueError(f"need at least 2 values for a standard deviation, got {len(values)}")
    return statistics.fmean(values), statistics.stdev(values)


def all_finite(obj: Any) -> bool:
    """True when every number inside a (nested) results dict is finite: JSON has no NaN."""
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def write_json(path: str | Path, results: dict) -> None:
    if not all_finite(results):
        raise ValueError(f"refusing to write non-finite results to {path}")
    write_text_atomic(path, json.dumps(results, indent=2, allow_nan=False) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:      # a log file: no need to wrap at 80 columns
        console = Console(width=120)
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
