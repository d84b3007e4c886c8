"""The plan of a comparison: which (model, seed, budget) units to train, with which settings.

A *unit* is one ordinary training run folder, ``DIR/runs/<model>-s<seed>-<budget>``, trained by
``python -m moelab train``; it is either finished (its ``summary.json`` exists), resumable (it has
checkpoints) or not started. ``DIR/compare.json`` holds the plan, so ``--resume DIR`` needs
nothing else and never retrains a finished unit. Unit folders are stored relative to DIR and
resolved against it when read (``unit_dir``), so a compare folder can be resumed from any working
directory, a copy reports its own runs, and an entry that resolves outside DIR is refused.

Seeds: N seeds ``train.seed + i`` (or an explicit list) are used identically for every model; a
seed sets both the initial weights and the order of the training batches, while the validation
batches are fixed, so the models' losses pair up seed by seed.

Budgets: each budget is a separate run with its own warmup + cosine schedule ending at that
budget ("separate runs per budget"). Hagele et al. 2024 show one warmup-stable-decay run with a
short cooldown branch per budget matches such runs at a fraction of the cost, but branching needs
the trainer to fork a run from a checkpoint with a new schedule, which it does not do yet.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from moelab.compare.matching import MATCH_MODES, describe_matching, match_models
from moelab.config import MAX_MINUTES, MAX_TOKENS, ConfigError

DEFAULT_MODELS = ("dense", "moe", "hybrid")
DEFAULT_BUDGET = "200k"    # per model and seed; why: docs/compare.md ("The default study")
DEFAULT_SEEDS = 3
DEFAULT_MATCH = "active"
PLAN_FILE = "compare.json"
PLAN_VERSION = 3               # 3: unit folders relative to the compare folder
RUNS_DIR = "runs"
HUGE_STEPS = 100_000_000
MAX_SEEDS = 64


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None
    seconds: float | None = None

    def describe(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens:,} tokens"
        return f"{self.seconds:g} s of training"

    @property
    def label(self) -> str:
        """Short, filename-safe: 500k, 1.5M, 90s."""
        if self.tokens is None:
            return f"{self.seconds:g}s"
        for unit, scale in (("M", 1_000_000), ("k", 1_000)):
            if self.tokens >= scale and self.tokens % (scale // 100 or 1) == 0:
                return f"{self.tokens / scale:g}{unit}"
        return str(self.tokens)


def parse_budget(text: str, option: str = "--budget") -> Budget:
    """'10m' minutes, '90s' seconds, '2M' / '500k' / '123456' tokens."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(m|min|s|sec|h)", t)
    if m:
        value, unit = float(m.group(1)), m.group(2)
        seconds = value * {"m": 60, "min": 60, "s": 1, "sec": 1, "h": 3600}[unit]
        if not 0 < seconds <= MAX_MINUTES * 60:
            raise ConfigError(f"{option} = {text!r} is invalid: must be > 0 and at most "
                              f"{MAX_MINUTES:,} minutes")
        return Budget(seconds=seconds)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKM]?)", t)
    if m:
        tokens = float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6}[m.group(2)]
        if not 1 <= tokens <= MAX_TOKENS:          # also before int(): a long digit string is inf
            raise ConfigError(f"{option} = {text!r} is invalid: must be between 1 and {MAX_TOKENS:,} tokens")
        return Budget(tokens=int(tokens))
    raise ConfigError(f"{option} = {text!r} is invalid: use minutes ('10m'), seconds ('90s') "
                      f"or tokens ('2M', '500k', '123456')")


MAX_BUDGET_SCALE = 1000.0


def scale_budget(budget: Budget, factor: float) -> Budget:
    """``--budget-scale``: the same budget ``factor`` times longer (tokens rounded, at least 1)."""
    if budget.tokens is not None:
        return Budget(tokens=max(1, round(budget.tokens * factor)))
    return Budget(seconds=budget.seconds * factor)


def check_budget_scale(factor: float) -> float:
    if not (isinstance(factor, (int, float)) and 0 < factor <= MAX_BUDGET_SCALE):
        raise ConfigError(f"--budget-scale = {factor!r} is invalid: must be > 0 and <= {MAX_BUDGET_SCALE:g}")
    return float(factor)


def parse_budgets(text: str) -> list[Budget]:
    """``--budgets 250k,500k,1M``: at least two token budgets, no repeats, in increasing order."""
    parts = [p for p in (x.strip() for x in text.split(",")) if p]
    if len(parts) < 2:
        raise ConfigError(f"--budgets = {text!r} is invalid: give at least two token budgets, "
                          f"e.g. 250k,500k,1M (or use --budget for one)")
    budgets = [parse_budget(p, "--budgets") for p in parts]
    if any(b.tokens is None for b in budgets):
        raise ConfigError(f"--budgets = {text!r} is invalid: scaling budgets must be token counts "
                          f"('250k', '1M'), not times: the fit is loss against tokens")
    tokens = [b.tokens for b in budgets]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"--budgets = {text!r} is invalid: a budget repeats")
    return sorted(budgets, key=lambda b: b.tokens)


def parse_seeds(text: str | int, base: int) -> list[int]:
    """``--seeds N`` -> [base, base + 1, ..., base + N - 1]; ``--seeds 3,7,11`` -> that list."""
    t = str(text).strip()
    if re.fullmatch(r"\d+", t):
        n = int(t)
        if not 1 <= n <= MAX_SEEDS:
            raise ConfigError(f"--seeds = {t} is invalid: must be between 1 and {MAX_SEEDS}")
        return [base + i for i in range(n)]
    parts = [p.strip() for p in t.split(",") if p.strip()]
    if len(parts) >= 2 and all(re.fullmatch(r"\d+", p) for p in parts):
        seeds = [int(p) for p in parts]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds = {t!r} is invalid: a seed repeats")
        return seeds
    raise ConfigError(f"--seeds = {t!r} is invalid: give a count (2) or a list of two or more "
                      f"non-negative seeds (1,2,3)")


def model_name(spec: str) -> str:
    return Path(spec).stem if spec.endswith(".toml") else spec


@dataclass(frozen=True)
class ModelSpec:
    """One compared model: its name (a folder-safe label), the preset or config TOML it starts
    from, and overrides of its own (a study's inline ``[models.NAME]`` table)."""

    name: str
    spec: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: "str | ModelSpec") -> "ModelSpec":
        return spec if isinstance(spec, ModelSpec) else cls(model_name(spec), spec)


def budget_overrides(budget: Budget, batch_size: int, seq_len: int) -> list[str]:
    """Train keys that make a run follow its budget, with evaluations spread over it."""
    out = [f"train.max_steps={HUGE_STEPS}", "train.log_every=1"]
    if budget.tokens is not None:
        steps = max(1, math.ceil(budget.tokens / (batch_size * seq_len)))
        out += [f"train.max_tokens={budget.tokens}", f"train.eval_every={max(1, steps // 12)}",
                f"train.save_every={max(1, steps // 4)}", f"train.warmup_steps={max(1, min(50, steps // 10))}"]
    else:
        out += [f"train.max_minutes={budget.seconds / 60}", "train.eval_every=25", "train.save_every=100"]
    return out


def _model_args(spec: str) -> list[str]:
    return ["--config", spec] if spec.endswith(".toml") else ["--preset", spec]


def build_plan(models: "list[str | ModelSpec]", budgets: list[Budget], budget_texts: list[str],
               seeds_text: str | int, match: str, overrides: list[str], out_dir: Path, command: str,
               nproc: int = 1, reference: str | None = None) -> dict:
    """Validate every unit's config (and its layout on ``nproc`` processes) before any training,
    and return the plan. ``overrides`` apply to every model, after each model's own; ``reference``
    names the model the verdicts are against (default: the first dense model, else the first)."""
    from moelab import resolve_config
    from moelab.parallel.layout import plan_layout
    if nproc < 1:
        raise ConfigError(f"--nproc = {nproc} is invalid: must be >= 1")
    if match not in MATCH_MODES:
        raise ConfigError(f"--match = {match!r} is invalid: must be one of {', '.join(MATCH_MODES)}")
    specs = [ModelSpec.of(m) for m in models]
    names = [m.name for m in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--models = {','.join(names)} is invalid: names repeat")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n)]
    if bad:
        raise ConfigError(f"--models: the name {bad[0]!r} cannot name a folder; rename the file")
    if reference is not None and reference not in names:
        raise ConfigError(f"reference = {reference!r} is not one of the models ({', '.join(names)})")
    # named ConfigError on bad input
    configs = [resolve_config(m.spec, [*m.overrides, *overrides]) for m in specs]
    sizings = match_models(names, [c.model for c in configs], match)
    seeds = parse_seeds(seeds_text, configs[0].train.seed)
    entries, units = [], []
    for m, cfg, sizing in zip(specs, configs, sizings):
        entries.append({"name": m.name, "spec": m.spec, "model_overrides": list(m.overrides),
                        "overrides": sizing.overrides, "sizing": sizing.public()})
    lineup = list(zip(specs, configs, entries))
    for budget, text in zip(budgets, budget_texts):
        for i, seed in enumerate(seeds):
            # each seed starts with the next model: a machine's speed drifts over a study (the
            # default one measured a 1.6x slowdown between its first and second seeds), and
            # rotating the order gives every model every position, so no model is always the
            # one that runs after the others (wall times and tokens/s are compared per seed)
            k = i % len(lineup)
            for m, cfg, entry in lineup[k:] + lineup[:k]:
                extra = entry["overrides"] + budget_overrides(budget, cfg.train.batch_size, cfg.train.seq_len) \
                    + [f"train.seed={seed}"]
                every = [*m.overrides, *overrides, *extra]
                plan_layout(resolve_config(m.spec, every).validate_for_training(), nproc)
                uid = f"{entry['name']}-s{seed}-{budget.label}"
                units.append({"id": uid, "model": entry["name"], "seed": seed, "budget": text,
                              "budget_tokens": budget.tokens, "budget_seconds": budget.seconds,
                              "run_dir": f"{RUNS_DIR}/{uid}",
                              "train_args": _model_args(m.spec) + sum((["--set", o] for o in every), [])})
    plan = {"version": PLAN_VERSION, "models": entries, "seeds": seeds, "budgets": budget_texts, "nproc": nproc,
            "budget_tokens": [b.tokens for b in budgets], "scaling": len(budgets) > 1,
            "match": match, "matching": describe_matching(sizings, match), "overrides": overrides,
            "units": units, "command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if reference is not None:
        plan["reference"] = reference
    return plan


def write_json(path: Path, obj) -> None:
    """Atomically: a compare killed mid-write keeps the previous file."""
    from moelab.fileio import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_plan(plan: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PLAN_FILE, plan)


def load_plan(out_dir: Path) -> dict:
    """The plan in ``out_dir``, every unit folder checked to resolve inside ``out_dir``. A version-2
    plan (unit folders stored as the path the compare was started with) is read with each unit at
    its place in this folder, ``runs/<unit id>``, where version 2 always put it."""
    path = out_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {str(out_dir)!r}: not a compare folder (no {PLAN_FILE})")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable plan ({e}); start a new compare") from None
    version = plan.get("version") if isinstance(plan, dict) else None
    if version == 2:
        for unit in plan["units"]:
            unit["run_dir"] = f"{RUNS_DIR}/{unit['id']}"
    elif version != PLAN_VERSION:
        raise ConfigError(f"--resume {str(out_dir)!r}: this compare was planned by an older moelab "
                          f"(plan version {plan.get('version', 1) if isinstance(plan, dict) else '?'}, "
                          f"this one reads {PLAN_VERSION}); start a new compare")
    for unit in plan["units"]:
        unit_dir(out_dir, unit)                    # refuse any entry outside the folder up front
    return plan


def unit_dir(out_dir: Path, unit: dict) -> Path:
    """The folder of ``unit``: its ``run_dir`` (relative to the compare folder) under ``out_dir``.
    Absolute names, ``..`` and symlinks that lead outside ``out_dir`` are refused: an edited
    compare.json must not make a compare train or read anywhere else."""
    rel = unit.get("run_dir")
    where = f"{out_dir / PLAN_FILE}: unit {unit.get('id', '?')!r} has run_dir = {rel!r}"
    if not isinstance(rel, str) or not rel.strip():
        raise ConfigError(f"{where}, which is not a folder name")
    if Path(rel).is_absolute() or rel.startswith("~"):
        raise ConfigError(f"{where}: unit folders are stored relative to the compare folder "
                          f"(e.g. '{RUNS_DIR}/{unit.get('id', 'unit')}'), not as absolute paths")
    root = out_dir.resolve()
    path = (out_dir / rel).resolve()
    if path == root or root not in path.parents:
        raise ConfigError(f"{where}, which resolves outside the compare folder ({path}); "
                          f"unit folders must stay inside {root}")
    return path


def headline_budget(plan: dict) -> str:
    """The budget the main table reports: the largest one."""
    return plan["budgets"][-1]
