"""The report of a study with variants: the answer over all variants, one table per variant of
the study's measures, a figure per measure, and results.json beside report.md. Each variant's
own compare report stays in its folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moelab.compare import stats
from moelab.fileio import write_text_atomic
from moelab.compare.analysis import Study, read_study
from moelab.compare.answer import (
    Expectation, claim_line, evaluate, judge_measure, judged_line, overall, run_values,
)
from moelab.compare.claim import measures_table
from moelab.compare.findings import budget_words
from moelab.compare.plan import write_json
from moelab.compare.plots import measure_bars


def _expectations(spec: dict) -> list[Expectation]:
    return [Expectation(e["model"], e["verdict"], e.get("vs"), e.get("measure", "val_loss"), e.get("variant"),
                        tuple(e.get("against_variants") or ())) for e in spec.get("expect") or []]


def _variant_line(name: str, study: Study) -> tuple[str, list]:
    rows = sorted(study.at(), key=lambda m: m.mean("val_loss") or 0.0)
    ranking = ", ".join(f"{m.name} {m.mean('val_loss'):.4f}" + ("" if m.sd("val_loss") is None
                                                                 else f" ± {m.sd('val_loss'):.4f}") for m in rows)
    ref = study.by_budget[study.headline][study.reference]
    judged = [judge_measure(m, ref, "val_loss") for m in study.at() if m.name != study.reference]
    judged = [j for j in judged if j is not None]
    gaps = "; ".join(judged_line(j) for j in judged)
    return f"- **{name}**: {ranking}. {gaps}.", judged


def routing_lines(plans: dict, out_dir: Path) -> list[str]:
    """For variants inspected by category (the two-domain mix): per MoE layer, whether routing
    depends on the domain (inspect's permutation test) and the expert that leans most to one."""
    lines = []
    for name, plan in plans.items():
        if plan.get("inspect_categories", "auto") == "auto":
            continue
        path = out_dir / name / "results.json"
        routing = json.loads(path.read_text(encoding="utf-8")).get("inspect", {}) if path.is_file() else {}
        for model, s in routing.items():
            parts = []
            for layer in s.get("by_category") or []:
                share = layer["share"]
                if layer["specialised"] is None or len(share) < 2:
                    parts.append(f"layer {layer['layer']}: one domain in the sample, not testable")
                    continue
                (a, sa), (b, sb) = list(share.items())[:2]
                lean = max(range(len(sa)), key=lambda e: abs(sa[e] - sb[e]))
                parts.append(f"layer {layer['layer']}: {'split by domain' if layer['specialised'] else 'no domain split'} "
                             f"(MI {layer['mi_bits']:.4f} bits vs {layer['mi_chance_bits']:.4f} shuffled"
                             + (f", z {layer['mi_z']:.1f}" if layer['mi_z'] is not None else "")
                             + f"); expert {lean} takes {sa[lean]:.0%} of {a} and {sb[lean]:.0%} of {b} tokens "
                             f"(uniform {layer['uniform']:.0%})")
            counts = dict(zip(s["categories"]["names"], s["categories"]["tokens"]))
            lines.append(f"- Routing by domain ({name}, {model}, first seed, {sum(counts.values()):,} held-out "
                         f"tokens: {', '.join(f'{k} {v:,}' for k, v in counts.items())}): " + "; ".join(parts) + ".")
    return lines


def build_study_report(plans: dict, out_dir: Path) -> dict:
    first = next(iter(plans.values()))
    spec = first["study"]
    studies = {name: read_study(plan, out_dir / name) for name, plan in plans.items()}
    lines, judged = [], {}
    for name, study in studies.items():
        line, js = _variant_line(name, study)
        lines.append(line)
        judged[name] = js
    results = [evaluate(e, studies) for e in _expectations(spec)]
    verdict = overall([r.outcome for r in results])
    budget = budget_words(first["budgets"][-1])
    n = len(first["seeds"])
    head = (f"At {budget} per model and seed ({n} seed{'s' if n != 1 else ''}), validation loss (nats, "
            f"lower is better, mean ± sd over seeds) and each model against {studies[next(iter(studies))].reference}, per variant:")
    answer_lines = [head, *lines, *routing_lines(plans, out_dir)]
    claim = spec.get("claim")
    if claim:
        answer_lines.append(claim_line(claim, verdict))
        answer_lines += [f"  - {r.line}" for r in results]
    figures = [measure_bars(m, studies, out_dir) for m in spec.get("report") or ["val_loss"]]
    variant_results = {}
    for name, study in studies.items():
        models = {}
        for m in study.at():
            models[m.name] = {measure: {"mean": stats.mean(run_values(m, measure)),
                                        "sd": stats.sd(run_values(m, measure)),
                                        "seeds": run_values(m, measure)}
                              for measure in spec.get("report") or ["val_loss"]}
        variant_results[name] = {"folder": name, "reference": study.reference, "models": models,
                                 "gaps": [j.public() for j in judged[name]]}
    meta = {}
    first_results = out_dir / next(iter(plans)) / "results.json"
    if first_results.is_file():
        meta = json.loads(first_results.read_text(encoding="utf-8"))
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    payload = {
        "study": {"name": spec.get("name"), "file": spec.get("file"), "question": spec["question"],
                  "claim": claim, "answer": " ".join(l.replace("**", "") for l in answer_lines),
                  "answer_lines": answer_lines, "verdict": verdict,
                  "expectations": [r.public() for r in results], "measured": spec.get("measured", ""),
                  "budget_scale": spec.get("budget_scale", 1.0)},
        "variants": variant_results,
        "seeds": first["seeds"], "budgets": first["budgets"], "match": first["match"],
        "machine": meta.get("machine"), "device": meta.get("device"), "torch": meta.get("torch"),
        "corpus": {name: json.loads((out_dir / name / "results.json").read_text(encoding="utf-8")).get("corpus")
                   for name in plans if (out_dir / name / "results.json").is_file()},
        "load_average_at_start": first.get("load_average"), "load_average_at_report": load,
        "command": first["command"], "figures": [p.name for p in figures],
    }
    write_json(out_dir / "results.json", payload)
    write_text_atomic(out_dir / "report.md", _markdown(payload, spec, studies, plans))
    return payload


def _markdown(payload: dict, spec: dict, studies: dict, plans: dict) -> str:
    from moelab.compare.report import study_header
    tables = []
    for name, study in studies.items():
        desc = ""
        tables.append(f"### {name}{desc}\n\n{measures_table(spec, study)}\n\nFull report: "
                      f"[{name}/report.md]({name}/report.md)\n")
    figs = "\n".join(f"![{p}]({p})" for p in payload["figures"])
    return f"""{study_header(payload['study'])}
## Per variant

Mean ± sd over seeds; in brackets the verdict against the reference by the paired rule of
`moelab compare` (docs/compare.md): a paired two-sided t-test over seeds at 95%.

{chr(10).join(tables)}
## Run

Command: `{payload['command']}`
Seeds: {', '.join(map(str, payload['seeds']))}; budgets: {', '.join(payload['budgets'])}; matching: {payload['match']}.
Machine: {payload['machine']} ({payload['device']}), torch {payload['torch']}; load average at start
{payload['load_average_at_start']}, at the report {payload['load_average_at_report']}.

## Figures

{figs}
"""
