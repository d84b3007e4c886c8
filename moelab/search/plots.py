"""The search's figures (matplotlib, file-only Agg backend): every trial's layer pattern as a row of
cells, the loss over trials, the two Pareto fronts, the retrain beside the fixed patterns, and the
parameter importances."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from moelab.figures import pyplot, save


def patterns(rows: list[dict], n_layers: int, out_dir: Path) -> Path:
    """One row per trial (complete ones by loss, then pruned ones by the step they reached), one
    cell per layer: blank for dense, shaded by log2(routed experts) for MoE, with the count."""
    plt = pyplot()
    from matplotlib import colors
    ordered = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: r["val_loss"]) + \
        sorted((r for r in rows if r["state"] == "pruned"), key=lambda r: -(r["pruned_at_step"] or 0))
    most = max([e for r in ordered for e in r["experts_per_layer"]] or [2])
    grid = [[math.nan] * n_layers for _ in ordered]                        # (trials, layers)
    for y, r in enumerate(ordered):
        for layer, e in zip(r["moe_layers"], r["experts_per_layer"]):
            grid[y][layer] = math.log2(e)
    h = max(2.4, 0.32 * len(ordered) + 1.2)
    fig, ax = plt.subplots(figsize=(max(4.8, 0.7 * n_layers + 3.8), h), dpi=110)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    ax.imshow(grid, aspect="auto", cmap=cmap, norm=colors.Normalize(0, math.log2(most)))
    for y, r in enumerate(ordered):
        for layer, e in zip(r["moe_layers"], r["experts_per_layer"]):
            ax.text(layer, y, str(e), ha="center", va="center", fontsize=7,
                    color="white" if math.log2(e) < 0.6 * math.log2(most) else "black")
    ax.set_yticks(range(len(ordered)))
    ax.set_yticklabels([f"#{r['number']}  " + (f"{r['val_loss']:.3f}" if r["state"] == "complete"
                                                else f"pruned @{r['pruned_at_step']}") for r in ordered], fontsize=7)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer (grey: dense FFN; number: routed experts)")
    ax.set_title("Trials by validation loss: where the MoE layers are")
    return save(fig, out_dir / "patterns.png")


def history(rows: list[dict], objective: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: r["number"])
    pruned = [r for r in rows if r["state"] == "pruned" and r["val_curve"]]
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], label="complete", zorder=3)
    ax.scatter([r["number"] for r in pruned], [r["val_curve"][-1][3] for r in pruned], marker="x",
               color="grey", label="pruned (last reported loss)", zorder=2)
    best, xs, ys = math.inf, [], []
    for r in done:
        best = min(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss" + (" at the base model's time" if objective == "loss_at_time" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir / "history.png")


def pareto(rows: list[dict], key: str, front: list[int], out_dir: Path) -> Path:
    """Validation loss against ``key`` (total_params: lower is better; tokens_per_s: higher)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    done = [r for r in rows if r["state"] == "complete"]
    dense = [r for r in done if not r["moe_layers"]]
    sparse = [r for r in done if r["moe_layers"]]
    scale = 1e6 if key == "total_params" else 1.0
    for group, label, marker in ((dense, "all-dense", "s"), (sparse, "with MoE layers", "o")):
        if not group:
            continue
        ax.scatter([r[key] / scale for r in group], [r["val_loss"] for r in group], label=label,
                   marker=marker, alpha=0.7)
    on = sorted((r for r in done if r["number"] in front), key=lambda r: r[key])
    ax.plot([r[key] / scale for r in on], [r["val_loss"] for r in on], color="black", lw=1,
            marker="D", markersize=4, label="Pareto front")
    for r in on:
        ax.annotate(f"#{r['number']}", (r[key] / scale, r["val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("total parameters (M)" if key == "total_params" else "training tokens/s (measured)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir / f"pareto_{key}.png")


def retrain(section: dict, out_dir: Path) -> Optional[Path]:
    plt = pyplot()
    pats = section["patterns"]
    if not pats:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for x, p in enumerate(pats):
        seeds = [v for v in p["val_loss_seeds"] if v is not None]
        ax.errorbar([x], [p["val_loss"]], yerr=[p["val_loss_sd"] or 0], fmt="o", capsize=4,
                    color="C3" if p["name"] == "best" else "C0")
        ax.scatter([x] * len(seeds), seeds, s=10, color="grey", zorder=3)
    ax.set_xticks(range(len(pats)))
    ax.set_xticklabels([p["name"] + ("\n= " + ", ".join(p["also"]) if p["also"] else "") for p in pats],
                       fontsize=7, rotation=20)
    ax.set_ylabel("validation loss (mean ± sd; dots: seeds)")
    ax.set_title(f"Retrained at seeds {', '.join(map(str, section['seeds']))}, {section['budget']} tokens")
    ax.grid(alpha=0.3, axis="y")
    return save(fig, out_dir / "retrain.png")


def importances(section: dict, out_dir: Path) -> Optional[Path]:
    values = section.get("values") or {}
    if not values:
        return None
    plt = pyplot()
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(5.6, 0.35 * len(names) + 1.4), dpi=110)
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel(f"importance ({section['evaluator']}, normalised)")
    ax.grid(alpha=0.3, axis="x")
    return save(fig, out_dir / "importances.png")
