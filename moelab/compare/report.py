"""The comparison's outputs: results.json, report.md with its plots, and the terminal table."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from moelab.compare import plots
from moelab.compare.analysis import SPIKE_RATIO, SPIKE_WINDOW, ModelResult, align, findings, read_run
from moelab.train.checkpoint import write_json

COLUMNS = [  # (header, function of a ModelResult -> text)
    ("model", lambda r: f"{r.name} ({r.kind})"),
    ("total params", lambda r: f"{r.total_params / 1e6:.2f}M"),
    ("active params", lambda r: f"{r.active_params / 1e6:.2f}M"),
    ("FLOPs/token", lambda r: f"{r.flops_per_token / 1e6:.1f}M"),
    ("tokens/s", lambda r: f"{r.tokens_per_s:,.0f}"),
    ("peak mem (est.)", lambda r: f"{r.peak_memory_bytes / 2**20:.0f} ({r.memory_estimate_bytes / 2**20:.0f}) MiB"),
    ("val loss", lambda r: f"{r.val_loss:.3f}"),
    ("ppl", lambda r: f"{r.perplexity:.1f}"),
    ("loss @ equal time", lambda r: _fmt(r.val_loss_at_equal_time, "{:.3f}")),
    ("load CV", lambda r: _fmt(r.load_cv, "{:.2f}")),
    ("max/mean", lambda r: _fmt(r.max_over_mean, "{:.2f}")),
    ("dropped", lambda r: _fmt(None if r.dropped_fraction is None else 100 * r.dropped_fraction, "{:.1f}%")),
    ("spikes", lambda r: str(r.loss_spikes)),
    ("aux loss", lambda r: f"{r.aux_loss:.4f}"),
]


def _fmt(value, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def build_report(plan: dict, out_dir: Path) -> tuple[list[ModelResult], dict, list[str]]:
    results = [read_run(m["name"], m["run_dir"]) for m in plan["models"]]
    ref = align(results)
    lines = findings(results, ref)
    meta = json.loads((Path(plan["models"][0]["run_dir"]) / "run_meta.json").read_text(encoding="utf-8"))

    figures = plots.loss_curves(results, out_dir)
    figures.append(plots.throughput_memory(results, out_dir))
    for r in results:
        heat = plots.expert_load_heatmap(r, out_dir)
        if heat is not None:
            figures.append(heat)

    payload = {
        "models": [r.public() for r in results],
        "equal_time_s": ref["equal_time_s"],
        "equal_tokens": ref["equal_tokens"],
        "budget": plan["budget"],
        "overrides": plan["overrides"],
        "corpus_sha256": meta["corpus"]["sha256"],
        "corpus": meta["corpus"],
        "machine": meta["machine"],
        "processor": meta.get("processor", ""),
        "device": meta["device"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": plan["command"],
        "findings": lines,
        "spike_rule": f"loss > {SPIKE_RATIO:.2f} x mean of the previous {SPIKE_WINDOW} steps",
        "figures": [p.name for p in figures],
    }
    write_json(out_dir / "results.json", payload)
    (out_dir / "report.md").write_text(_markdown(results, payload), encoding="utf-8")
    return results, payload, lines


def _markdown(results: list[ModelResult], payload: dict) -> str:
    head = "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(f(r) for _, f in COLUMNS) + " |" for r in results]
    corpus = payload["corpus"]
    figs = "\n".join(f"![{name}]({name})" for name in payload["figures"])
    findings_md = "\n".join(f"- {line}" for line in payload["findings"])
    return f"""# Dense vs MoE vs Hybrid-MoE

Command: `{payload['command']}`
Budget: {payload['budget']} per model; same tokenizer, data order and seed for every model.
Corpus: {corpus['source']} ({corpus['num_bytes'] / 1e6:.1f} MB, {corpus['num_docs']} documents, sha256 `{corpus['sha256'][:16]}…`).
Machine: {payload['machine']} ({payload['device']}), torch {payload['torch']}.

{head}
{rule}
{chr(10).join(rows)}

Loss is validation cross-entropy in nats/token on held-out documents. "Loss @ equal time" is
interpolated at {payload['equal_time_s']:.0f} s of training (the shortest run). Peak memory is
measured ({results[0].__dict__.get('memory_method', 'peak RSS above the pre-model level on CPU, allocator peak on CUDA')})
with the analytic estimate (weights + gradients + AdamW + activations) in brackets; on CPU the
measured figure also holds PyTorch's own runtime buffers (a roughly constant 200+ MiB). Router statistics
are averaged over MoE layers and the last quarter of training. A spike is a step whose loss exceeds
{payload['spike_rule'].split('loss > ')[1]}.

## What this run shows

{findings_md}

## Figures

{figs}
"""


def print_table(results: list[ModelResult], lines: list[str], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    import sys
    # a file or pipe gets the whole table, not one squeezed to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="Dense vs MoE vs Hybrid-MoE", show_lines=False)
    for header, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for r in results:
        table.add_row(*(f(r) for _, f in COLUMNS))
    console.print(table)
    console.print("[bold]What this run shows[/bold]")
    for line in lines:
        console.print(f" - {line.replace('**', '')}", highlight=False)
    console.print(f"report: {out_dir / 'report.md'}  (results.json and PNG figures beside it)")
