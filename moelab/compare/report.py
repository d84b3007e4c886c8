"""The comparison's outputs: results.json, report.md with its plots, and the terminal tables."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from moelab.compare import plots, stats
from moelab.compare.analysis import SPIKE_RATIO, SPIKE_WINDOW, ModelSummary, comparisons, read_study
from moelab.compare.findings import all_findings, budget_words, scaling_section
from moelab.compare.claim import default_study, measures_table, study_answer
from moelab.compare.plan import unit_dir, write_json
from moelab.fileio import write_text_atomic
from moelab.runfolder import RUN_META_FILE


def _fmt(value, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def _pm(m: ModelSummary, key: str, pattern: str, scale: float = 1.0) -> str:
    mean, sd = m.mean(key), m.sd(key)
    if mean is None:
        return "-"
    text = pattern.format(mean / scale)
    return text if sd is None else f"{text} ± {pattern.format(sd / scale)}"


def _verdict_cell(verdicts: dict, name: str) -> str:
    c = verdicts.get(name)
    if c is None:
        return "reference"
    return f"{c.verdict.gap:+.4f} {c.verdict.verdict}"


def quality_columns(verdicts: dict) -> list[tuple[str, Callable[[ModelSummary], str]]]:
    return [
        ("model", lambda m: f"{m.name} ({m.kind})"),
        ("total params", lambda m: f"{m.mean('total_params') / 1e6:.2f}M"),
        ("active params", lambda m: f"{m.mean('active_params') / 1e6:.2f}M"),
        ("FLOPs/token", lambda m: f"{m.mean('flops_per_token') / 1e6:.1f}M"),
        ("val loss", lambda m: _pm(m, "val_loss", "{:.4f}")),
        ("batch SE", lambda m: _fmt(m.mean("val_loss_batch_se"), "{:.4f}")),
        ("gap, verdict", lambda m: _verdict_cell(verdicts, m.name)),
        ("loss @ equal time", lambda m: _pm(m, "val_loss_at_equal_time", "{:.4f}")),
        ("train tokens/s", lambda m: _pm(m, "tokens_per_s", "{:,.0f}")),
        ("peak mem MiB (est.)", lambda m: f"{_pm(m, 'peak_memory_bytes', '{:.0f}', 2**20)} "
                                          f"({m.mean('memory_estimate_bytes') / 2**20:.0f})"),
        ("load CV", lambda m: _pm(m, "load_cv", "{:.2f}")),
        ("dropped", lambda m: _fmt(None if m.mean("dropped_fraction") is None else 100 * m.mean("dropped_fraction"), "{:.1f}%")),
        ("spikes", lambda m: str(sum(m.seeds_of("loss_spikes")))),
    ]


INFERENCE_COLUMNS: list[tuple[str, Callable[[ModelSummary], str]]] = [
    ("model", lambda m: m.name),
    ("prefill tok/s", lambda m: _pm(m, "prefill_tokens_per_s", "{:,.0f}")),
    ("decode tok/s (b=1)", lambda m: _pm(m, "decode_tokens_per_s", "{:,.0f}")),
    ("decode tok/s (b=8)", lambda m: _pm(m, "decode_tokens_per_s_batch8", "{:,.0f}")),
    ("KV bytes/token", lambda m: _fmt(m.mean("kv_cache_bytes_per_token"), "{:,.0f}")),
    ("weights read/token b=1", lambda m: _fmt(None if m.mean("weight_bytes_per_token_batch1") is None
                                              else m.mean("weight_bytes_per_token_batch1") / 2**20, "{:.2f} MiB")),
    ("b=8", lambda m: _fmt(None if m.mean("weight_bytes_per_token_batch8") is None
                           else m.mean("weight_bytes_per_token_batch8") / 2**20, "{:.2f} MiB")),
]


COMM_COLUMNS: list[tuple[str, Callable[[ModelSummary], str]]] = [
    ("model", lambda m: m.name),
    ("all-to-all MiB/step", lambda m: _pm(m, "alltoall_bytes_per_step", "{:.2f}", 2**20)),
    ("FSDP MiB/step", lambda m: _pm(m, "fsdp_bytes_per_step", "{:.2f}", 2**20)),
    ("time in collectives", lambda m: _fmt(None if m.mean("comm_time_share") is None
                                           else 100 * m.mean("comm_time_share"), "{:.0f}%")),
]


def _has_comm(rows: list[ModelSummary]) -> bool:
    return any(m.mean("fsdp_bytes_per_step") is not None for m in rows)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_report(plan: dict, out_dir: Path) -> tuple[list[ModelSummary], dict, dict]:
    """Read the study back, write results.json, report.md and the figures; returns the headline
    rows, the results payload and the headline verdicts by model name."""
    study = read_study(plan, out_dir)
    comps = comparisons(study)
    scaling = scaling_section(study, plan["budget_tokens"]) if plan["scaling"] else None
    lines = all_findings(study, comps, plan["matching"], plan["match"], scaling)
    rows = study.at()
    meta = json.loads((unit_dir(out_dir, plan["units"][0]) / RUN_META_FILE).read_text(encoding="utf-8"))
    spec = plan.get("study") or default_study(plan, study)
    answer = study_answer(spec, study, budget_words(study.headline))

    figures = plots.loss_curves(study, out_dir) + plots.gap_curves(study, out_dir)
    if scaling is not None:
        figures += plots.scaling_plots(scaling, out_dir)
    figures.append(plots.throughput_memory(study, out_dir))
    inf = plots.inference(study, out_dir)
    figures += [inf] if inf else []
    for m in rows:
        heat = plots.expert_load_heatmap(m, out_dir)
        if heat is not None:
            figures.append(heat)
    if spec.get("name") and not spec.get("variant"):      # a study's own measures, as bars
        figures += [plots.measure_bars(measure, {"": study}, out_dir) for measure in spec.get("report") or []]

    n = len(study.seeds)
    payload = {
        "study": {"name": spec.get("name"), "file": spec.get("file"), "variant": spec.get("variant"),
                  "question": spec["question"], "claim": spec.get("claim"), **answer.public(),
                  "measured": spec.get("measured", ""), "budget_scale": spec.get("budget_scale", 1.0)},
        "seeds": study.seeds,
        "budget": study.headline,
        "budgets": study.budgets,
        "reference": study.reference,
        "match": plan["match"],
        "matching": plan["matching"],
        "sizing": {m["name"]: m["sizing"] for m in plan["models"]},
        "noise": {"rule": stats.rule_text(), "confidence": stats.CONFIDENCE,
                  "basis": "seeds" if n >= 2 else "validation batches",
                  "t": stats.t_critical(n - 1) if n >= 2 else None},
        "models": [m.public() for m in rows],
        "comparisons": [c.public() for c in comps],
        "alignment": [{"budget": b, "seed": s, **v} for (b, s), v in study.alignment.items()],
        "overrides": plan["overrides"],
        "nproc": plan.get("nproc", 1),
        "corpus_sha256": meta["corpus"]["sha256"],
        "corpus": meta["corpus"],
        "machine": meta["machine"],
        "processor": meta.get("processor", ""),
        "device": meta["device"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": plan.get("load_average"),
        "load_average_at_report": _load_average(),
        "command": plan["command"],
        "findings": lines,
        "spike_rule": f"loss > {SPIKE_RATIO:.2f} x mean of the previous {SPIKE_WINDOW} steps",
        "figures": [p.name for p in figures],
    }
    if scaling is not None:
        payload["scaling"] = scaling
    routing = inspect_summaries(plan, out_dir)
    if routing:
        payload["inspect"] = routing
    write_json(out_dir / "results.json", payload)
    verdicts = {c.model: c for c in comps if c.budget == study.headline and c.measure == "val_loss"}
    write_text_atomic(out_dir / "report.md", _markdown(rows, verdicts, payload, measures_table(spec, study)))
    return rows, payload, verdicts


def _md_table(columns, rows) -> str:
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def study_header(study: dict) -> str:
    """Title, question, claim and the short answer: what a report opens with."""
    name = study.get("name")
    title = f"# Study `{name}`" + (f", variant `{study['variant']}`" if study.get("variant") else "") \
        if name else "# Dense vs MoE vs Hybrid-MoE"
    lines = [title, "", f"**Question.** {study['question']}", ""]
    claim = study.get("claim")
    if claim:
        anchor = f" Published: {claim['anchor']}" if claim.get("anchor") else ""
        lines += [f"**Claim tested.** {claim['text']} ({claim['source']}).{anchor}", ""]
    lines += ["## Answer", "", *study["answer_lines"], ""]
    if study.get("budget_scale", 1.0) != 1.0:
        lines += [f"Budgets scaled by --budget-scale {study['budget_scale']:g} from the study file's.", ""]
    return "\n".join(lines)


def _markdown(rows: list[ModelSummary], verdicts: dict, payload: dict, measures: str = "") -> str:
    corpus = payload["corpus"]
    figs = "\n".join(f"![{name}]({name})" for name in payload["figures"])
    findings_md = "\n".join(f"- {line}" for line in payload["findings"])
    seeds = payload["seeds"]
    scaling = ""
    if "scaling" in payload:
        s = payload["scaling"]
        head = "| model | " + " | ".join(s["budget_labels"]) + " | fit E + A·D^-alpha |"
        rule = "|---|" + "---|" * len(s["budgets"]) + "---|"
        body = []
        for name, m in s["models"].items():
            cells = [_fmt(v, "{:.4f}") + ("" if sd is None else f" ± {sd:.4f}")
                     for v, sd in zip(m["val_loss"], m["val_loss_sd"])]
            f = m["fit"]
            fit = f"E={f['E']:.3f}, A={f['A']:.4g}, alpha={f['alpha']:.3f}" if f else "-"
            body.append(f"| {name} | " + " | ".join(cells) + f" | {fit} |")
        scaling = (f"\n## Scaling with tokens\n\nFinal validation loss (mean ± sd over seeds) per budget; "
                   f"{s['method']}.\n\n" + "\n".join([head, rule, *body]) + "\n\n"
                   + "\n".join(f"- {c['statement']}" for c in s["crossover"].values()) + "\n")
    measures_md = f"\n{measures}\n" if measures and payload["study"].get("name") else ""
    return f"""{study_header(payload['study'])}{measures_md}
## Results

Command: `{payload['command']}`
Budget: {budget_words(payload['budget'])} per model and seed (the table's budget){'; budgets ' + ', '.join(payload['budgets']) if len(payload['budgets']) > 1 else ''}.
Seeds: {', '.join(map(str, seeds))} (the same for every model: initial weights and batch order); same tokenizer and validation batches for every model.
Matching: {payload['matching'][0]}
Corpus: {corpus['source']} ({corpus['num_bytes'] / 1e6:.1f} MB, {corpus['num_docs']} documents, sha256 `{corpus['sha256'][:16]}…`).
Machine: {payload['machine']} ({payload['device']}), torch {payload['torch']}; load average at start {payload['load_average_at_start']}, at the report {payload['load_average_at_report']}.

{_md_table(quality_columns(verdicts), rows)}

## Inference (trained weights, same prompts, eager, greedy)

{_md_table(INFERENCE_COLUMNS, rows)}
{_comm_section(rows, payload)}{scaling}{_routing_section(payload)}
## How to read the tables

Numbers are means ± sd over the {len(seeds)} seed(s). Loss is validation cross-entropy in nats/token
on held-out documents; "batch SE" is its standard error over the validation batches. "Gap, verdict"
is the loss minus {payload['reference']}'s and the verdict of the rule: {payload['noise']['rule']}.
"Loss @ equal time" is interpolated at the shortest run's training time within each seed. Peak
memory is measured (peak RSS above the pre-model level on CPU, allocator peak on CUDA) with the
analytic estimate in brackets. Router statistics are averaged over MoE layers and the last quarter
of training. A spike is a step whose loss exceeds {payload['spike_rule'].split('loss > ')[1]}.

Inference: prefill: 8 prompts of up to 64 validation tokens in one forward; decode: up to 64 greedy steps with
the KV cache at batch 1 and 8; median of 5 interleaved rounds. KV bytes at the model's dtype;
"weights read" counts every weight a decode step touches (the experts its tokens were routed to,
not the embedding table) divided by the tokens it decodes.

## What this run shows

{findings_md}

## Figures

{figs}
"""


def _comm_section(rows: list[ModelSummary], payload: dict) -> str:
    if not _has_comm(rows):
        return ""
    return f"""
## Communication ({payload.get('nproc', '?')} processes)

{_md_table(COMM_COLUMNS, rows)}

Per training step, the busiest rank: bytes it sent through the expert-parallel all-to-all and
FSDP's all-gathers and reduce-scatters (forward and backward), and the share of the step the
slowest rank spent inside those collectives (metrics.jsonl `comm`).
"""


def _routing_section(payload: dict) -> str:
    routing = payload.get("inspect")
    if not routing:
        return ""
    from moelab.inspect import summary_markdown
    body = "\n".join(summary_markdown(s, name) for name, s in routing.items())
    return f"""
## Routing (`moelab inspect`, first seed)

{body}

Normalised load is tokens per expert over the balanced share (DeepSeek-V3's measure);
specialisation follows OLMoE (vocabulary: share of a token id's occurrences sent to its most
frequent expert); `moelab inspect RUN` gives the full analysis of any run folder.
"""


def inspect_summaries(plan: dict, out_dir: Path) -> dict:
    """The inspect summary measured for each sparse model (``measure.inspect_units``)."""
    from moelab.compare.measure import load_measurement
    out = {}
    for unit in plan["units"]:
        s = load_measurement(out_dir, unit).get("inspect")
        if s and unit["model"] not in out:
            out[unit["model"]] = s
    return out


def print_tables(rows: list[ModelSummary], payload: dict, verdicts: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    # a file or pipe gets the whole table, not one squeezed to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 240)
    for title, columns in ((f"Dense vs MoE vs Hybrid-MoE: {budget_words(payload['budget'])}, "
                            f"{len(payload['seeds'])} seed(s), mean ± sd", quality_columns(verdicts)),
                           ("Inference on the trained weights", INFERENCE_COLUMNS)):
        table = Table(title=title, show_lines=False)
        for header, _ in columns:
            table.add_column(header, justify="left" if header == "model" else "right")
        for m in rows:
            table.add_row(*(f(m) for _, f in columns))
        console.print(table)
    console.print("[bold]What this run shows[/bold]")
    for line in payload["findings"]:
        console.print(f" - {line.replace('**', '')}", highlight=False, markup=False)
    print_answer(payload["study"], console)
    console.print(f"report: {out_dir / 'report.md'}  (results.json and PNG figures beside it)")


def print_answer(study: dict, console=None) -> None:
    """The question and the short answer, last on the terminal where they stay in view."""
    if console is None:
        from rich.console import Console
        console = Console(width=None if sys.stdout.isatty() else 240)
    console.print("[bold]Question[/bold]: ", end="")
    console.print(study["question"], highlight=False, markup=False)
    console.print("[bold]Answer[/bold]")
    for line in study["answer_lines"]:           # no markup: "[mix]" is text, not a style
        console.print(" " + line.replace("**", ""), highlight=False, markup=False)

