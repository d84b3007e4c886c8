"""Numbers for the comparison, read back from each model's run folder (summary.json,
metrics.jsonl, run_meta.json), so the report shows exactly what the runs logged."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from moelab.train.trainer import SUMMARY_FILE, load_metrics

SPIKE_WINDOW = 20        # a spike is judged against the mean of the previous 20 steps' losses
SPIKE_RATIO = 1.25       # ... and must exceed it by more than 25%: batch-to-batch noise at the
                         # default batch reaches ~13% (the same hard batches in every model)
TAIL_FRACTION = 0.25     # router statistics are averaged over the last quarter of training


@dataclass
class ModelResult:
    name: str
    run_dir: str
    kind: str                       # "dense", "moe" or "hybrid" (by its layer pattern)
    total_params: int
    active_params: int
    flops_per_token: int
    tokens: int
    train_time_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    memory_estimate_bytes: int
    val_loss: float
    perplexity: float
    val_loss_at_equal_time: float | None
    val_loss_at_equal_tokens: float | None
    load_cv: float | None
    max_over_mean: float | None
    dropped_fraction: float | None
    loss_spikes: int
    aux_loss: float
    balance_loss: float | None
    z_loss: float | None
    eval_curve: list[dict] = field(default_factory=list)     # tokens, elapsed_s, val_loss
    expert_load: list[list[float]] = field(default_factory=list)   # per MoE layer, per expert
    moe_layers: list[int] = field(default_factory=list)

    def public(self) -> dict:
        d = dict(self.__dict__)
        return d


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


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def read_run(name: str, run_dir: str | Path) -> ModelResult:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    metrics = load_metrics(run_dir)
    trains = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    tail = trains[int(len(trains) * (1 - TAIL_FRACTION)):] or trains
    routers = [layer for r in tail for layer in r.get("router", [])]
    layers = sorted({r["layer"] for r in routers})
    load = []
    for layer in layers:
        rows = [r["load"] for r in routers if r["layer"] == layer and "load" in r]
        load.append([sum(col) / len(col) for col in zip(*rows)] if rows else [])
    n_layers = config["model"]["n_layers"]
    kind = "dense" if not layers else ("moe" if len(layers) == n_layers else "hybrid")
    mem_est = summary.get("memory_estimate_bytes") or {}
    return ModelResult(
        name=name, run_dir=str(run_dir), kind=kind,
        total_params=summary["total_params"], active_params=summary["active_params"],
        flops_per_token=summary["flops_per_token"], tokens=summary["tokens"],
        train_time_s=summary["train_time_s"], tokens_per_s=summary["tokens_per_s"] or 0.0,
        peak_memory_bytes=summary["peak_memory_bytes"],
        memory_estimate_bytes=int(mem_est.get("total", 0)),
        val_loss=summary["val_loss"], perplexity=summary["perplexity"],
        val_loss_at_equal_time=None, val_loss_at_equal_tokens=None,
        load_cv=_mean([r["load_cv"] for r in routers]),
        max_over_mean=_mean([r["max_over_mean"] for r in routers]),
        dropped_fraction=_mean([r["dropped_fraction"] for r in routers]),
        loss_spikes=count_spikes([r["loss"] for r in trains]),
        aux_loss=_mean([r["aux_loss"] for r in tail]) or 0.0,
        balance_loss=_mean([r.get("balance_loss") for r in routers]),
        z_loss=_mean([r.get("z_loss") for r in routers]),
        eval_curve=[{"tokens": e["tokens"], "elapsed_s": e["elapsed_s"], "val_loss": e["val_loss"]} for e in evals],
        expert_load=load, moe_layers=layers,
    )


def align(results: list[ModelResult]) -> dict:
    """Fill in the loss at equal wall-clock (the shortest run's training time) and at equal
    tokens (the smallest token count); returns the two reference points."""
    equal_time = min(r.train_time_s for r in results)
    equal_tokens = min(r.tokens for r in results)
    for r in results:
        curve = r.eval_curve
        r.val_loss_at_equal_time = interpolate([c["elapsed_s"] for c in curve], [c["val_loss"] for c in curve], equal_time)
        r.val_loss_at_equal_tokens = interpolate([c["tokens"] for c in curve], [c["val_loss"] for c in curve], equal_tokens)
    return {"equal_time_s": equal_time, "equal_tokens": equal_tokens}


def findings(results: list[ModelResult], ref: dict) -> list[str]:
    """The 'what this run shows' sentences, derived from the numbers only."""
    lines = []

    def best(key):
        scored = [(getattr(r, key), r) for r in results if getattr(r, key) is not None]
        return sorted(scored, key=lambda t: t[0])

    at_tokens = best("val_loss_at_equal_tokens")
    if len(at_tokens) >= 2:
        (l0, w), (l1, s) = at_tokens[0], at_tokens[1]
        lines.append(f"At equal tokens ({ref['equal_tokens']:,}), **{w.name}** has the lowest validation "
                     f"loss, {l0:.3f}, ahead of {s.name} by {l1 - l0:.3f} nats "
                     f"({100 * (1 - math.exp(l0 - l1)):.1f}% lower perplexity).")
    at_time = best("val_loss_at_equal_time")
    if len(at_time) >= 2:
        (l0, w), (l1, s) = at_time[0], at_time[1]
        lines.append(f"At equal wall-clock ({ref['equal_time_s']:.0f} s of training), **{w.name}** leads "
                     f"with {l0:.3f}, {l1 - l0:.3f} nats ahead of {s.name}.")
    fastest = max(results, key=lambda r: r.tokens_per_s)
    slowest = min(results, key=lambda r: r.tokens_per_s)
    if fastest is not slowest:
        lines.append(f"Throughput: {fastest.name} trains at {fastest.tokens_per_s:,.0f} tokens/s, "
                     f"{fastest.tokens_per_s / max(slowest.tokens_per_s, 1e-9):.2f}x {slowest.name}'s "
                     f"{slowest.tokens_per_s:,.0f}; measured peak memory ranges from "
                     f"{min(r.peak_memory_bytes for r in results) / 2**20:.0f} to "
                     f"{max(r.peak_memory_bytes for r in results) / 2**20:.0f} MiB.")
    dense = [r for r in results if r.kind == "dense"]
    sparse = [r for r in results if r.kind in ("moe", "hybrid")]
    if dense and sparse:
        d = dense[0]
        for m in sparse:
            if m.val_loss_at_equal_tokens is None or d.val_loss_at_equal_tokens is None:
                continue
            ratio = m.active_params / d.active_params
            gap = d.val_loss_at_equal_tokens - m.val_loss_at_equal_tokens
            verdict = ("agrees with" if gap > 0.01 else
                       "does not show (the gap is within 0.01 nats)" if abs(gap) <= 0.01 else
                       "goes against")
            lines.append(f"{m.name} ({m.total_params / 1e6:.1f}M total, {m.active_params / 1e6:.2f}M active = "
                         f"{ratio:.2f}x {d.name}'s active) {'beats' if gap > 0 else 'trails'} {d.name} by "
                         f"{abs(gap):.3f} nats at equal tokens: this {verdict} the usual claim that MoE "
                         f"wins at equal active compute, at this scale and budget.")
            if m.val_loss_at_equal_time is not None and d.val_loss_at_equal_time is not None:
                gap_t = d.val_loss_at_equal_time - m.val_loss_at_equal_time
                lines.append(f"At equal time {m.name} {'leads' if gap_t > 0 else 'trails'} {d.name} by "
                             f"{abs(gap_t):.3f} nats, since it runs at "
                             f"{m.tokens_per_s / max(d.tokens_per_s, 1e-9):.2f}x the dense throughput here.")
    for r in sparse:
        if r.load_cv is not None:
            lines.append(f"{r.name}: expert load CV {r.load_cv:.2f} (max/mean {r.max_over_mean:.2f}), "
                         f"dropped {100 * (r.dropped_fraction or 0):.1f}% of assignments, "
                         f"{r.loss_spikes} loss spike(s).")
    if all(r.loss_spikes == 0 for r in results):
        lines.append(f"No run had a loss spike (a step more than {100 * (SPIKE_RATIO - 1):.0f}% above "
                     f"the mean of its previous {SPIKE_WINDOW} steps).")
    return lines
