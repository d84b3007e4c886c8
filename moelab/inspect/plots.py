"""Figures of an inspection, drawn from the inspect.json dict with matplotlib's file-only Agg
backend. Each function writes one PNG and returns its path (None when there is nothing to draw)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from moelab.inspect.trace import Trace, draw_trace
from moelab.figures import pyplot, save


def _grid(n: int, size: float = 3.6):
    plt = pyplot()
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.6, size * rows), dpi=110, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _integer_ticks(ax, x: bool = True, y: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator
    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def load_heatmap(result: dict, out_dir: Path) -> Path:
    plt = pyplot()
    layers = result["layers"]
    E = max(l["num_experts"] for l in layers)
    grid = np.full((len(layers), E), np.nan)
    for i, l in enumerate(layers):
        grid[i, :l["num_experts"]] = l["normalized_load"]
    top = max(2.0, float(np.nanmax(grid)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * E + 2.5), max(2.4, 0.45 * len(layers) + 1.5)), dpi=110)
    im = ax.imshow(grid, cmap="RdBu_r", vmin=0.0, vmax=top, aspect="auto")
    if E <= 16:
        for i in range(len(layers)):
            for e in range(E):
                if not np.isnan(grid[i, e]):
                    ax.text(e, i, f"{grid[i, e]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("expert")
    _integer_ticks(ax, y=False)
    ax.set_yticks(range(len(layers)), [f"layer {l['layer']}" for l in layers])
    ax.set_title("Normalised load (load / ideal; 1 = balanced, 0 = dead)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save(fig, out_dir / "load_heatmap.png")


def coactivation(result: dict, out_dir: Path) -> Path:
    layers = result["layers"]
    fig, axes = _grid(len(layers))
    for ax, l in zip(axes, layers):
        ratio = np.array(l["coactivation_ratio"], dtype=float)
        np.fill_diagonal(ratio, np.nan)
        im = ax.imshow(ratio, cmap="viridis", vmin=0.0, vmax=max(0.05, float(np.nanmax(ratio))))
        ax.set_title(f"layer {l['layer']}")
        _integer_ticks(ax)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        fig.colorbar(im, ax=ax, shrink=0.75, pad=0.08)
    fig.suptitle("Co-activation N(Ei, Ej) / N(Ei)  (OLMoE Eq. 6; diagonal blank)")
    return save(fig, out_dir / "coactivation.png")


def transitions(result: dict, out_dir: Path) -> Optional[Path]:
    pairs = [l for l in result["layers"] if l["transition"] is not None]
    if not pairs:
        return None
    fig, axes = _grid(len(pairs))
    for ax, l in zip(axes, pairs):
        counts = np.array(l["transition"], dtype=float)
        chose = np.maximum(np.diag(np.array(l["coactivation"], dtype=float)), 1)
        im = ax.imshow(counts / chose[:, None], cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {l['layer']} -> {l['next_layer']}")
        _integer_ticks(ax)
        ax.set_xlabel(f"expert in layer {l['next_layer']}")
        ax.set_ylabel(f"expert in layer {l['layer']}")
        fig.colorbar(im, ax=ax, shrink=0.75, pad=0.08)
    fig.suptitle("P(j chosen in the next MoE layer | i chosen here); uniform = k/E")
    return save(fig, out_dir / "transitions.png")


def category_share(result: dict, out_dir: Path) -> Optional[Path]:
    layers = [l for l in result["layers"] if l["category_share"]]
    if not layers:
        return None
    fig, axes = _grid(len(layers), size=4.0)
    for ax, l in zip(axes, layers):
        names = list(l["category_share"])
        lift = np.array([l["category_share"][n] for n in names]) / l["category_uniform"]
        log2 = np.log2(np.clip(lift, 1 / 8, 8))
        im = ax.imshow(log2, cmap="PuOr_r", vmin=-2, vmax=2, aspect="auto")
        ax.set_yticks(range(len(names)), [n[:24] for n in names], fontsize=7)
        ax.set_xlabel("expert")
        _integer_ticks(ax, y=False)
        ax.set_title(f"layer {l['layer']}", fontsize=9)
        cb = fig.colorbar(im, ax=ax, shrink=0.75)
        cb.set_label("log2(share / (k/E))", fontsize=7)
    fig.suptitle("Category share vs the uniform rate k/E")
    return save(fig, out_dir / "category_share.png")


def specialization(result: dict, out_dir: Path) -> Path:
    plt = pyplot()
    layers = result["layers"]
    xs = np.arange(len(layers))
    labels = [f"L{l['layer']}" for l in layers]
    has_cat = any(l.get("category_mi_bits") is not None for l in layers)
    fig, axes = plt.subplots(1, 2 if has_cat else 1, figsize=(9 if has_cat else 5, 3.6), dpi=110, squeeze=False)
    a = axes[0][0]
    w = 0.38
    a.bar(xs - w / 2, [l["vocab_specialization"] or 0 for l in layers], w, label="measured")
    a.bar(xs + w / 2, [l["vocab_specialization_chance"] or 0 for l in layers], w, label="chance")
    a.set_xticks(xs, labels)
    a.set_ylim(0, 1)
    a.set_title("Vocabulary specialisation (OLMoE 5.4, top-1)")
    a.legend(fontsize=8)
    if has_cat:
        b = axes[0][1]
        b.bar(xs - w / 2, [l.get("category_mi_bits") or 0 for l in layers], w, label="measured")
        b.bar(xs + w / 2, [l.get("category_mi_chance_bits") or 0 for l in layers], w,
              yerr=[l.get("category_mi_chance_std_bits") or 0 for l in layers], label="shuffled")
        b.set_xticks(xs, labels)
        b.set_ylabel("bits")
        b.set_title("I(category; expert) vs shuffled categories")
        b.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir / "specialization.png")


def ablation(result: dict, out_dir: Path) -> Optional[Path]:
    layers = result["layers"]
    if result.get("ablation") is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for l in layers:
        pts = [(l["normalized_load"][e], d, e) for e, d in enumerate(l["ablation_delta_loss"]) if d is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=f"layer {l['layer']}")
        for x, y, e in pts:
            if e in l["specialists"]:
                ax.annotate(f"L{l['layer']}E{e}", (x, y), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("normalised load")
    ax.set_ylabel("loss increase when routed around (nats)")
    ax.set_title("Expert ablation: traffic vs damage (labels: specialists)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_dir / "ablation.png")


def saturation(result: dict, out_dir: Path) -> Optional[Path]:
    layers = result["layers"]
    if result.get("against") is None:
        return None
    plt = pyplot()
    xs = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    ax.bar(xs - 0.19, [l["saturation_top1"] for l in layers], 0.38, label="top-1")
    ax.bar(xs + 0.19, [l["saturation_topk"] for l in layers], 0.38, label=f"top-{result['top_k']}")
    ax.set_xticks(xs, [f"L{l['layer']}" for l in layers])
    ax.set_ylim(0, 1.05)
    ax.set_title("Router saturation vs --against (OLMoE 5.1)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir / "saturation.png")


def draw_all(result: dict, out_dir: Path) -> list[Path]:
    paths = [load_heatmap(result, out_dir), coactivation(result, out_dir), transitions(result, out_dir),
             category_share(result, out_dir), specialization(result, out_dir), ablation(result, out_dir),
             saturation(result, out_dir)]
    if result.get("trace"):
        t = result["trace"]
        paths.append(draw_trace(Trace(t["token_ids"], t["tokens"], t["layers"], t["experts"]),
                                out_dir / "trace.png"))
    return [p for p in paths if p is not None]
