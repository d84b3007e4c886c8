"""Numbers for the comparison: each unit read back from its run folder (summary.json,
metrics.jsonl, config.json) and its measurements, then summarised over seeds per model and budget,
and the gaps to the reference model judged by the rule in ``stats``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from moelab.compare import stats
from moelab.compare.measure import load_measurement
from moelab.runfolder import CONFIG_FILE, SUMMARY_FILE, load_metrics

SPIKE_WINDOW = 20        # a spike is judged against the mean of the previous 20 steps' losses
SPIKE_RATIO = 1.25       # ... and must exceed it by more than 25%: batch-to-batch noise at the
                         # default batch reaches ~13% (the same hard batches in every model)
TAIL_FRACTION = 0.25     # router statistics are averaged over the last quarter of training

# Every per-model number, in table order; results.json gives each as its mean over seeds, with
# ``<name>_sd`` (sample sd over seeds; null with one seed) and ``<name>_seeds`` (one per seed).
NUMBERS = (
    "total_params", "active_params", "flops_per_token", "tokens", "train_time_s", "tokens_per_s",
    "peak_memory_bytes", "memory_estimate_bytes", "val_loss", "perplexity", "val_loss_batch_se",
    "val_loss_rescored", "val_loss_at_equal_time", "val_loss_at_equal_tokens", "load_cv", "max_over_mean",
    "dropped_fraction", "loss_spikes", "aux_loss", "balance_loss", "z_loss",
    "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8",
    "kv_cache_bytes_per_token", "weight_bytes_per_token_batch1", "weight_bytes_per_token_batch8",
    "alltoall_bytes_per_step", "fsdp_bytes_per_step", "comm_time_share",
    "max_spike", "nonfinite_steps", "router_entropy", "router_entropy_min", "load_cv_early",
    "dead_experts",
)
# Numbers where more is better (speeds); for every other number less is better (losses, load
# imbalance, drops, spikes). Verdicts on these compare log ratios, on the others differences.
HIGHER_IS_BETTER = ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                    "decode_tokens_per_s_batch8", "router_entropy", "router_entropy_min")
DEAD_SHARE = 0.01        # an expert is dead when its share of the last quarter's assignments is
                         # below 1% of the uniform share 1/E
INFERENCE = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8",
             "kv_cache_bytes_per_token", "weight_bytes_per_token_batch1", "weight_bytes_per_token_batch8")


@dataclass
class UnitResult:
    """One (model, seed, budget) run."""

    unit: str
    model: str
    seed: int
    budget: str
    run_dir: str
    kind: str                                  # "dense", "moe" or "hybrid" (by its layer pattern)
    values: dict                               # name in NUMBERS -> float or None
    eval_curve: list = field(default_factory=list)      # {tokens, elapsed_s, val_loss}
    expert_load: list = field(default_factory=list)     # per MoE layer, share per expert
    moe_layers: list = field(default_factory=list)
    val_batch_losses: Optional[list] = None
    inference: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.values.get(key)


def largest_spike(losses: list[float], window: int = SPIKE_WINDOW) -> Optional[float]:
    """The largest ratio of a step's training loss to the mean of the previous ``window`` steps
    (the size of the worst spike; below 1 when the loss only fell); None for short runs."""
    ratios = [losses[i] / (sum(losses[i - window:i]) / window) for i in range(window, len(losses))
              if sum(losses[i - window:i]) > 0]
    return max(ratios) if ratios else None


def _entropy_fraction(records: list[dict]) -> Optional[float]:
    """Mean router entropy over MoE layers as a fraction of its maximum log(E): 1 = every token
    spreads its scores evenly, near 0 = every token is sure of its experts (collapse)."""
    values = [r["entropy"] / math.log(len(r["load"])) for r in records
              if "entropy" in r and len(r.get("load", [])) > 1]
    return stats.mean(values)


def count_spikes(losses: list[float], window: int = SPIKE_WINDOW, ratio: float = SPIKE_RATIO) -> int:
    """Steps whose training loss exceeds the mean of the previous ``window`` steps by more than
    ``ratio`` (the first ``window`` steps have no baseline and are not judged)."""
    spikes = 0
    for i in range(window, len(losses)):
        baseline = sum(losses[i - window:i]) / window
        if losses[i] > ratio * baseline:
            spikes += 1
    return spikes


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of y at x over increasing xs; None outside the measured range (with a
    relative tolerance of 1e-6 at both ends, for times read back from JSON)."""
    tol = 1e-6 * max(1.0, abs(xs[-1])) if xs else 0.0
    if not xs or x < xs[0] - tol or x > xs[-1] + tol:
        return None
    x = min(max(x, xs[0]), xs[-1])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def communication(trains: list[dict]) -> dict:
    """Per training step of a distributed run (metrics' ``comm``, one value per rank): bytes the
    busiest rank sent in all-to-all and in FSDP collectives, and the share of the step the slowest
    rank spent in them. None for a one-process run."""
    recs = [r["comm"] for r in trains if "comm" in r]
    if len(recs) < 2:
        return {"alltoall_bytes_per_step": None, "fsdp_bytes_per_step": None, "comm_time_share": None}
    step_s = (trains[-1]["elapsed_s"] - trains[0]["elapsed_s"]) / max(1, trains[-1]["step"] - trains[0]["step"])
    comm_s = stats.mean([max(a + f for a, f in zip(c["alltoall_s"], c["fsdp_s"])) for c in recs])
    return {"alltoall_bytes_per_step": stats.mean([max(c["alltoall_bytes"]) for c in recs]),
            "fsdp_bytes_per_step": stats.mean([max(c["fsdp_bytes"]) for c in recs]),
            "comm_time_share": comm_s / step_s if step_s > 0 else None}


def read_unit(unit: dict, out_dir: Path) -> UnitResult:
    from moelab.compare.plan import unit_dir
    run_dir = unit_dir(out_dir, unit)
    summary = _read_json(run_dir / SUMMARY_FILE)
    config = _read_json(run_dir / CONFIG_FILE)
    metrics = load_metrics(run_dir)
    trains = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    tail = trains[int(len(trains) * (1 - TAIL_FRACTION)):] or trains
    head = trains[:max(1, int(len(trains) * TAIL_FRACTION))]
    routers = [layer for r in tail for layer in r.get("router", [])]
    layers = sorted({r["layer"] for r in routers})
    load = []
    for layer in layers:
        rows = [r["load"] for r in routers if r["layer"] == layer and "load" in r]
        load.append([sum(col) / len(col) for col in zip(*rows)] if rows else [])
    dead = sum(sum(share < DEAD_SHARE / len(row) for share in row) for row in load if row)
    entropy_by_step = [_entropy_fraction(r.get("router", [])) for r in trains]
    entropy_by_step = [e for e in entropy_by_step if e is not None]
    n_layers = config["model"]["n_layers"]
    kind = "dense" if not layers else ("moe" if len(layers) == n_layers else "hybrid")
    measured = load_measurement(out_dir, unit)
    batch_losses = measured.get("val_batch_losses")
    inference = measured.get("inference") or {}
    se = None
    if batch_losses and len(batch_losses) >= 2:
        se = stats.sd(batch_losses) / math.sqrt(len(batch_losses))
    # the batches compare scored must be the trainer's: their mean is the logged validation loss
    rescored = stats.mean(batch_losses) if batch_losses else None
    values = {
        "total_params": summary["total_params"], "active_params": summary["active_params"],
        "flops_per_token": summary["flops_per_token"], "tokens": summary["tokens"],
        "train_time_s": summary["train_time_s"], "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "memory_estimate_bytes": int((summary.get("memory_estimate_bytes") or {}).get("total", 0)),
        "val_loss": summary["val_loss"], "perplexity": summary["perplexity"],
        "val_loss_batch_se": se,
        "val_loss_rescored": rescored,
        "load_cv": stats.mean([r["load_cv"] for r in routers]),
        "max_over_mean": stats.mean([r["max_over_mean"] for r in routers]),
        "dropped_fraction": stats.mean([r["dropped_fraction"] for r in routers]),
        "loss_spikes": count_spikes([r["loss"] for r in trains if not r.get("skipped")]),
        "max_spike": largest_spike([r["loss"] for r in trains if not r.get("skipped")]),
        "nonfinite_steps": sum(1 for r in trains if r.get("skipped")),
        "router_entropy": _entropy_fraction(routers),
        "router_entropy_min": min(entropy_by_step) if entropy_by_step else None,
        "load_cv_early": stats.mean([l["load_cv"] for r in head for l in r.get("router", [])]),
        "dead_experts": dead if layers else None,
        "aux_loss": stats.mean([r["aux_loss"] for r in tail]) or 0.0,
        "balance_loss": stats.mean([r.get("balance_loss") for r in routers]),
        "z_loss": stats.mean([r.get("z_loss") for r in routers]),
        **{k: inference.get(k) for k in INFERENCE},
        **communication(tail),
    }
    return UnitResult(unit["id"], unit["model"], unit["seed"], unit["budget"], unit["run_dir"], kind, values,
                      [{"tokens": e["tokens"], "elapsed_s": e["elapsed_s"], "val_loss": e["val_loss"]} for e in evals],
                      load, layers, batch_losses, inference)


def align(units: list[UnitResult]) -> dict:
    """Within one (seed, budget) group: the loss at equal wall-clock (the shortest run's training
    time) and at equal tokens (the smallest token count); returns the two reference points."""
    equal_time = min(u["train_time_s"] for u in units)
    equal_tokens = min(u["tokens"] for u in units)
    for u in units:
        c = u.eval_curve
        u.values["val_loss_at_equal_time"] = interpolate([e["elapsed_s"] for e in c], [e["val_loss"] for e in c], equal_time)
        u.values["val_loss_at_equal_tokens"] = interpolate([e["tokens"] for e in c], [e["val_loss"] for e in c], equal_tokens)
    return {"equal_time_s": equal_time, "equal_tokens": equal_tokens}


def rescoring_mismatches(units: list[UnitResult], tolerance: float = 1e-3) -> list[str]:
    """Units whose re-scored validation batches do not average to the trainer's logged loss."""
    return [f"{u.unit} ({u['val_loss_rescored']:.4f} vs {u['val_loss']:.4f})" for u in units
            if u["val_loss_rescored"] is not None and abs(u["val_loss_rescored"] - u["val_loss"]) > tolerance]


@dataclass
class ModelSummary:
    """One model at one budget, over its seeds (``runs`` in seed order)."""

    name: str
    budget: str
    runs: list

    @property
    def kind(self) -> str:
        return self.runs[0].kind

    def seeds_of(self, key: str) -> list:
        return [r[key] for r in self.runs]

    def mean(self, key: str) -> Optional[float]:
        return stats.mean(self.seeds_of(key))

    def sd(self, key: str) -> Optional[float]:
        return stats.sd(self.seeds_of(key))

    def public(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "budget": self.budget,
             "seeds": [r.seed for r in self.runs], "run_dirs": [r.run_dir for r in self.runs]}
        for key in NUMBERS:
            d[key] = self.mean(key)
            d[f"{key}_sd"] = self.sd(key)
            d[f"{key}_seeds"] = self.seeds_of(key)
        d["moe_layers"] = self.runs[0].moe_layers
        d["expert_load"] = [[stats.mean(col) for col in zip(*rows)]
                            for rows in zip(*(r.expert_load for r in self.runs))] if self.runs[0].expert_load else []
        d["experts_touched_batch8"] = self.runs[0].inference.get("experts_touched_batch8")
        d["experts_per_layer"] = self.runs[0].inference.get("experts_per_layer")
        d["inference_note"] = self.runs[0].inference.get("note")
        d["eval_curves"] = {str(r.seed): r.eval_curve for r in self.runs}
        return d


@dataclass
class Study:
    """Everything read back: ``by_budget[budget][model] -> ModelSummary``, model order kept."""

    seeds: list
    budgets: list
    models: list
    by_budget: dict
    reference: str
    alignment: dict                      # (budget, seed) -> equal_time_s / equal_tokens
    mismatches: list = field(default_factory=list)   # see rescoring_mismatches

    @property
    def headline(self) -> str:
        return self.budgets[-1]

    def at(self, budget: Optional[str] = None) -> list[ModelSummary]:
        return [self.by_budget[budget or self.headline][m] for m in self.models]


def read_study(plan: dict, out_dir: Path) -> Study:
    units = [read_unit(u, out_dir) for u in plan["units"]]
    alignment = {}
    for budget in plan["budgets"]:
        for seed in plan["seeds"]:
            group = [u for u in units if u.budget == budget and u.seed == seed]
            alignment[(budget, seed)] = align(group)
    models = [m["name"] for m in plan["models"]]
    by_budget = {b: {m: ModelSummary(m, b, [u for u in units if u.budget == b and u.model == m])
                     for m in models} for b in plan["budgets"]}
    first = by_budget[plan["budgets"][-1]]
    reference = plan.get("reference") or next((m for m in models if first[m].kind == "dense"), models[0])
    return Study(plan["seeds"], plan["budgets"], models, by_budget, reference, alignment,
                 rescoring_mismatches(units))


@dataclass(frozen=True)
class Comparison:
    """``model`` against ``reference`` on one measure at one budget."""

    model: str
    reference: str
    budget: str
    measure: str               # "val_loss" or "val_loss_at_equal_time"
    gaps: list                 # the paired samples the verdict used
    verdict: stats.Verdict

    def public(self) -> dict:
        return {"model": self.model, "reference": self.reference, "budget": self.budget,
                "measure": self.measure, "paired_gaps": self.gaps, **self.verdict.public()}


def compare(model: ModelSummary, ref: ModelSummary, measure: str = "val_loss") -> Optional[Comparison]:
    """Judge ``model - ref`` on ``measure``: over seeds with two or more; with one seed over the
    validation batches (final loss only); None if the numbers are missing."""
    pairs = [(a[measure], b[measure]) for a, b in zip(model.runs, ref.runs)]
    gaps = [a - b for a, b in pairs if a is not None and b is not None]
    if not gaps:
        return None
    if len(gaps) >= 2:
        return Comparison(model.name, ref.name, model.budget, measure, gaps, stats.judge(gaps, "seeds"))
    a, b = model.runs[0].val_batch_losses, ref.runs[0].val_batch_losses
    if measure == "val_loss" and a and b and len(a) == len(b) and len(a) >= 2:
        per_batch = [x - y for x, y in zip(a, b)]
        return Comparison(model.name, ref.name, model.budget, measure, per_batch,
                          stats.judge(per_batch, "validation batches"))
    return Comparison(model.name, ref.name, model.budget, measure, gaps, stats.judge(gaps, "none"))


def comparisons(study: Study) -> list[Comparison]:
    out = []
    for budget in study.budgets:
        rows = study.by_budget[budget]
        ref = rows[study.reference]
        for name in study.models:
            if name == study.reference:
                continue
            for measure in ("val_loss", "val_loss_at_equal_time"):
                c = compare(rows[name], ref, measure)
                if c is not None:
                    out.append(c)
    return out


def speed_verdict(model: ModelSummary, ref: ModelSummary, key: str) -> Optional[stats.Verdict]:
    """The same rule on log(reference speed / model speed): "ahead" means the model is faster.
    Paired over seeds, or with one seed over the interleaved timing rounds."""
    pairs = [(a[key], b[key]) for a, b in zip(model.runs, ref.runs)]
    logs = [math.log(b / a) for a, b in pairs if a and b]
    if len(logs) >= 2:
        return stats.judge(logs, "seeds")
    ra = model.runs[0].inference.get("rounds_" + key) or []
    rb = ref.runs[0].inference.get("rounds_" + key) or []
    per_round = [math.log(b / a) for a, b in zip(ra, rb) if a and b]
    if len(per_round) >= 2:
        return stats.judge(per_round, "timing rounds")
    return stats.judge(logs, "none") if logs else None
