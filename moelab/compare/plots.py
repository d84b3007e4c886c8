"""The comparison's figures, drawn with matplotlib's file-only Agg backend. Bands and error bars
are ± one standard deviation over seeds; thin lines are the individual seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from moelab.compare.analysis import ModelSummary, Study, interpolate
from moelab.figures import pyplot, save

TIME_POINTS = 40


def _band(ax, xs, rows: list[list[float]], label: str, color=None, seeds: bool = True):
    """Mean line of ``rows`` (one per seed) with a ± sd band and, faintly, each seed."""
    arr = np.array(rows, dtype=float)                                   # (seeds, points)
    mean = np.nanmean(arr, axis=0)
    line, = ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
    if len(rows) >= 2:
        sd = np.nanstd(arr, axis=0, ddof=1)
        ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2, color=line.get_color())
        if seeds:
            for row in rows:
                ax.plot(xs, row, lw=0.6, alpha=0.45, color=line.get_color())
    return line


def _curve(m: ModelSummary, key: str) -> tuple[list[float], list[list[float]]]:
    """A model's eval curve on the first seed's points (x = ``key``), one loss row per seed."""
    base = m.runs[0].eval_curve
    if key == "tokens":
        xs = [e["tokens"] for e in base]
        rows = [[interpolate([e["tokens"] for e in r.eval_curve], [e["val_loss"] for e in r.eval_curve], x)
                 for x in xs] for r in m.runs]
        return xs, [[np.nan if v is None else v for v in row] for row in rows]
    n = min(len(r.eval_curve) for r in m.runs)
    xs = [float(np.mean([r.eval_curve[i]["elapsed_s"] for r in m.runs])) for i in range(n)]
    return xs, [[r.eval_curve[i]["val_loss"] for i in range(n)] for r in m.runs]


def loss_curves(study: Study, out_dir: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    for key, label, name in (("tokens", "training tokens", "val_loss_vs_tokens.png"),
                             ("elapsed_s", "training wall-clock (s)", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for m in study.at():
            xs, rows = _curve(m, key)
            _band(ax, xs, rows, f"{m.name} ({m.kind})", seeds=False)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Validation loss vs {label.split(' (')[0]} ({study.headline} budget)")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save(fig, out_dir / name))
    return paths


def _gap_rows(m: ModelSummary, ref: ModelSummary, key: str) -> tuple[list[float], list[list[float]]]:
    """Per seed, ``m - ref`` on a shared grid of ``key`` (the reference's eval tokens, or
    ``TIME_POINTS`` times inside every run's evaluated span)."""
    pairs = list(zip(m.runs, ref.runs))
    if key == "tokens":
        xs = [e["tokens"] for e in ref.runs[0].eval_curve]
    else:
        lo = max(c.eval_curve[0]["elapsed_s"] for p in pairs for c in p)
        hi = min(c.eval_curve[-1]["elapsed_s"] for p in pairs for c in p)
        xs = list(np.linspace(lo, hi, TIME_POINTS)) if hi > lo else []
    rows = []
    for a, b in pairs:
        row = []
        for x in xs:
            va = interpolate([e[key] for e in a.eval_curve], [e["val_loss"] for e in a.eval_curve], x)
            vb = interpolate([e[key] for e in b.eval_curve], [e["val_loss"] for e in b.eval_curve], x)
            row.append(np.nan if va is None or vb is None else va - vb)
        rows.append(row)
    return xs, rows


def gap_curves(study: Study, out_dir: Path) -> list[Path]:
    """Each model's loss minus the reference's, where the differences are visible."""
    rows = study.at()
    ref = next(m for m in rows if m.name == study.reference)
    others = [m for m in rows if m is not ref]
    if not others:
        return []
    plt = pyplot()
    paths = []
    for key, label, name in (("tokens", "training tokens", "gap_vs_tokens.png"),
                             ("elapsed_s", "training wall-clock (s)", "gap_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        ax.axhline(0.0, color="black", lw=0.8)
        for m in others:
            xs, gaps = _gap_rows(m, ref, key)
            if xs:
                _band(ax, xs, gaps, f"{m.name} - {ref.name}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation loss minus {ref.name}'s (nats)")
        ax.set_title(f"Loss gap to {ref.name} (below 0: ahead); band ± sd over {len(study.seeds)} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save(fig, out_dir / name))
    return paths


def scaling_plots(scaling: dict, out_dir: Path) -> list[Path]:
    """Final validation loss per budget on log axes, against tokens and training FLOPs, with the
    fitted E + A * D^-alpha curves and the crossovers."""
    plt = pyplot()
    budgets = np.array(scaling["budgets"], dtype=float)
    dense_grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 200)
    paths = []
    for axis, label, name in (("tokens", "training tokens", "scaling_vs_tokens.png"),
                              ("train_flops", "training FLOPs (3 x forward FLOPs/token x tokens)",
                               "scaling_vs_flops.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        for model, m in scaling["models"].items():
            xs = np.array(m[axis], dtype=float)
            sd = [0.0 if s is None else s for s in m["val_loss_sd"]]
            bars = ax.errorbar(xs, m["val_loss"], yerr=sd, fmt="o", capsize=3, label=model)
            if m["fit"]:
                f = m["fit"]
                per_token = xs[0] / m["tokens"][0] if axis == "train_flops" else 1.0
                ax.plot(dense_grid * per_token, f["E"] + f["A"] * dense_grid ** -f["alpha"],
                        color=bars[0].get_color(), lw=1, alpha=0.8)
        if axis == "tokens":
            for model, tokens in scaling["crossover_tokens"].items():
                if tokens is not None and dense_grid[0] <= tokens <= dense_grid[-1]:
                    ax.axvline(tokens, ls=":", color="gray")
                    ax.annotate(f"{model} crosses", (tokens, ax.get_ylim()[1]), fontsize=7,
                                rotation=90, va="top", ha="right")
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter
        plain = FuncFormatter(lambda v, _pos: f"{v:.2f}")          # not 5.2 x 10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel(label)
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title("Loss vs budget, with fits E + A·D^-alpha")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        paths.append(save(fig, out_dir / name))
    return paths


def _bars(ax, names, means, sds, offset=0.0, width=0.8, label=None):
    xs = np.arange(len(names)) + offset
    ax.bar(xs, [0 if v is None else v for v in means], width,
           yerr=[0 if s is None else s for s in sds], capsize=3, label=label)
    return xs


def throughput_memory(study: Study, out_dir: Path) -> Path:
    plt = pyplot()
    rows = study.at()
    names = [m.name for m in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    _bars(a, names, [m.mean("tokens_per_s") for m in rows], [m.sd("tokens_per_s") for m in rows])
    a.set_xticks(range(len(names)), names)
    a.set_ylabel("training tokens / s")
    a.set_title("Training throughput")
    w = 0.38
    _bars(b, names, [m.mean("peak_memory_bytes") / 2**20 for m in rows],
          [None if m.sd("peak_memory_bytes") is None else m.sd("peak_memory_bytes") / 2**20 for m in rows],
          -w / 2, w, "measured peak")
    _bars(b, names, [m.mean("memory_estimate_bytes") / 2**20 for m in rows], [None] * len(rows),
          w / 2, w, "analytic estimate")
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("MiB")
    b.set_title("Training memory")
    b.legend()
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir / "throughput_memory.png")


def inference(study: Study, out_dir: Path) -> Optional[Path]:
    rows = study.at()
    if all(m.mean("prefill_tokens_per_s") is None for m in rows):
        return None
    plt = pyplot()
    names = [m.name for m in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.9), dpi=110)
    keys = (("prefill_tokens_per_s", "prefill (8 prompts)"), ("decode_tokens_per_s", "decode, batch 1"),
            ("decode_tokens_per_s_batch8", "decode, batch 8"))
    w = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        _bars(a, names, [m.mean(key) for m in rows], [m.sd(key) for m in rows], (i - 1) * w, w, label)
    a.set_yscale("log")
    a.set_xticks(range(len(names)), names)
    a.set_ylabel("tokens / s (log)")
    a.set_title("Inference speed (eager, KV cache)")
    a.legend(fontsize=8)
    keys = (("weight_bytes_per_token_batch1", "weights read / token, batch 1"),
            ("weight_bytes_per_token_batch8", "weights read / token, batch 8"))
    w = 0.38
    for i, (key, label) in enumerate(keys):
        _bars(b, names, [None if m.mean(key) is None else m.mean(key) / 2**20 for m in rows],
              [None] * len(rows), (i - 0.5) * w, w, label)
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("MiB per decoded token")
    b.set_title("Weight bytes each decoded token reads")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir / "inference.png")


def expert_load_heatmap(m: ModelSummary, out_dir: Path) -> Optional[Path]:
    """Share of routed assignments per expert (columns) in each MoE layer (rows), averaged over
    the last quarter of training and over seeds; 1/E everywhere is perfect balance."""
    load = m.public()["expert_load"]
    rows = [row for row in load if row]
    if not rows:
        return None
    plt = pyplot()
    width = max(len(r) for r in rows)
    grid = [r + [float("nan")] * (width - len(r)) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * width + 2), 0.5 * len(rows) + 1.8), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [f"layer {l}" for l in m.runs[0].moe_layers[:len(rows)]])
    ax.set_xticks(range(width))
    ax.set_xlabel("expert")
    ax.set_title(f"{m.name}: share of tokens per expert (uniform = {1 / width:.3f})")
    fig.colorbar(im, ax=ax)
    return save(fig, out_dir / f"expert_load_{m.name}.png")


def measure_bars(measure: str, studies: dict, out_dir: Path) -> Path:
    """A study's measure as grouped bars: variants along x (one group without variants), one bar
    per model, ± sd over seeds."""
    from moelab.compare import stats
    from moelab.compare.answer import describe_measure, run_values
    plt = pyplot()
    variants = list(studies)
    models = []
    for s in studies.values():
        models += [m for m in s.models if m not in models]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(variants) + 2), 4.0), dpi=110)
    width = 0.8 / len(models)
    limits: list = []
    for i, name in enumerate(models):
        means, sds = [], []
        for v in variants:
            row = studies[v].by_budget[studies[v].headline].get(name)
            vals = run_values(row, measure) if row is not None else []
            means.append(np.nan if stats.mean(vals) is None else stats.mean(vals))
            sds.append(0.0 if stats.sd(vals) is None else stats.sd(vals))
        xs = np.arange(len(variants)) + (i - (len(models) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=name, alpha=0.85)
        for x, v in zip(xs, variants):                     # each seed, as a dot on its bar
            row = studies[v].by_budget[studies[v].headline].get(name)
            seeds = [y for y in (run_values(row, measure) if row is not None else []) if y is not None]
            ax.plot([x] * len(seeds), seeds, "o", ms=3, color="black", alpha=0.6)
        span = [m + d for m, d in zip(means, sds)] + [m - d for m, d in zip(means, sds)]
        limits.extend(y for y in span if np.isfinite(y))
    ax.set_xticks(range(len(variants)), [v or "all models" for v in variants])
    if measure.startswith("val_loss") and limits:       # losses differ in the second decimal
        lo, hi = min(limits), max(limits)
        pad = 0.15 * (hi - lo) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(describe_measure(measure))
    ax.set_title(f"{describe_measure(measure)}" + (" by variant" if len(variants) > 1 else "")
                 + " (mean ± sd over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir / f"study_{measure.replace('@', '_at_')}.png")
