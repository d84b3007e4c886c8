"""The comparison's figures, drawn with matplotlib's file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

from moelab.compare.analysis import ModelResult


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(results: list[ModelResult], out_dir: Path) -> list[Path]:
    plt = _plt()
    paths = []
    for x_key, label, name in (("tokens", "training tokens", "val_loss_vs_tokens.png"),
                               ("elapsed_s", "training wall-clock (s)", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for r in results:
            xs = [c[x_key] for c in r.eval_curve]
            ys = [c["val_loss"] for c in r.eval_curve]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{r.name} ({r.kind})")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Validation loss vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def throughput_memory(results: list[ModelResult], out_dir: Path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    names = [r.name for r in results]
    a.bar(names, [r.tokens_per_s for r in results], color="tab:blue")
    a.set_ylabel("training tokens / s")
    a.set_title("Throughput")
    xs = range(len(results))
    width = 0.38
    b.bar([x - width / 2 for x in xs], [r.peak_memory_bytes / 2**20 for r in results], width, label="measured peak")
    b.bar([x + width / 2 for x in xs], [r.memory_estimate_bytes / 2**20 for r in results], width, label="analytic estimate")
    b.set_xticks(list(xs), names)
    b.set_ylabel("MiB")
    b.set_title("Training memory")
    b.legend()
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "throughput_memory.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def expert_load_heatmap(result: ModelResult, out_dir: Path) -> Path | None:
    """Share of routed assignments per expert (columns) in each MoE layer (rows), averaged over
    the last quarter of training; 1/E everywhere is perfect balance."""
    rows = [row for row in result.expert_load if row]
    if not rows:
        return None
    plt = _plt()
    width = max(len(r) for r in rows)
    grid = [r + [float("nan")] * (width - len(r)) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * width + 2), 0.5 * len(rows) + 1.8), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [f"layer {l}" for l in result.moe_layers[:len(rows)]])
    ax.set_xticks(range(width))
    ax.set_xlabel("expert")
    ax.set_title(f"{result.name}: share of tokens per expert (uniform = {1 / width:.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out_dir / f"expert_load_{result.name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path
