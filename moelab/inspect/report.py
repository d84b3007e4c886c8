"""The files and the console view of an inspection: inspect.json, report.md, PNGs, and a summary
table. Everything here reads the inspect.json dict; nothing is measured again."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.fileio import write_text_atomic
from moelab.inspect import plots, widths

TOP_TOKENS_SHOWN = 6


def _f(x, fmt: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _tok(text: str) -> str:
    """A token's text for a markdown table cell: visible whitespace, no pipes or backticks."""
    return repr(text)[1:-1].replace("|", "\\|").replace("`", "'")


def _worst_ablation(layer: dict):
    deltas = [(d, e) for e, d in enumerate(layer["ablation_delta_loss"] or []) if d is not None]
    return max(deltas) if deltas else None


def _category_verdict(layer: dict) -> str:
    if layer.get("category_mi_bits") is None:
        return "-"
    word = "yes" if layer["category_specialised"] else "no"
    return f"{word}, {100 * layer['category_mi_fraction']:.1f}% (z {_f(layer.get('category_mi_z'), '.0f', 'inf')})"


def summary_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The per-layer summary table, shared by the console and report.md."""
    headers = ["layer", "experts", "dead", "overloaded", "load min-max", "entropy",
               "vocab spec (chance)", "category spec. (I/H)", "strongest category", "worst ablation"]
    if result.get("against"):
        headers += ["saturation top-1", f"top-{result['top_k']}"]
    rows = []
    for l in result["layers"]:
        best = l.get("strongest_category")
        worst = _worst_ablation(l)
        row = [str(l["layer"]), str(l["num_experts"]), str(len(l["dead_experts"])),
               str(len(l["overloaded_experts"])),
               f"{l['min_normalized_load']:.2f}-{l['max_normalized_load']:.2f}",
               _f(l["entropy"], ".2f"),
               f"{_f(l['vocab_specialization'], '.2f')} ({_f(l['vocab_specialization_chance'], '.2f')})",
               _category_verdict(l),
               f"{best['category']} -> E{best['expert']} ({best['vs_uniform']:.2f}x)" if best else "-",
               f"E{worst[1]} {worst[0]:+.4f}" if worst else "-"]
        if result.get("against"):
            row += [_f(l.get("saturation_top1")), _f(l.get("saturation_topk"))]
        rows.append(row)
    return headers, rows


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict, figures: list[Path]) -> str:
    k = result["top_k"]
    out = [f"# moelab inspect: {result['run']}", "",
           f"{result['tokens']:,} tokens of {result['corpus']}, routed once through "
           f"{len(result['layers'])} MoE layers (blocks {result['moe_layers']}) with top-{k}; "
           f"mean next-token loss on them {result['loss']:.4f}.", "",
           "## Summary", "", _md_table(*summary_rows(result)), "",
           "Load: tokens per expert / ideal (tokens x k / E), DeepSeek-V3's normalised load; dead = "
           "no tokens, overloaded = at least 2x the ideal. Entropy: mean router entropy (nats). "
           "Vocabulary specialisation: OLMoE 5.4 on first choices, chance = the same counts drawn "
           "from the layer's own marginal. Category specialisation: mutual information between a "
           "token's category and its experts as a share I/H of the category's entropy; yes = more "
           "than randomly permuted categories by z > 3 standard deviations.", ""]
    out += _load_section(result) + _coactivation_section(result) + _vocab_section(result)
    out += _category_section(result) + _ablation_section(result) + _saturation_section(result)
    out += _trace_section(result) + widths.markdown(result)
    out += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(out)


def _load_section(result: dict) -> list[str]:
    lines = ["## Load", ""]
    for l in result["layers"]:
        loads = ", ".join(f"{x:.2f}" for x in l["normalized_load"])
        lines.append(f"- layer {l['layer']}: normalised load [{loads}]; dead {l['dead_experts'] or 'none'}; "
                     f"overloaded {l['overloaded_experts'] or 'none'}; dropped "
                     f"{100 * l['dropped_fraction']:.2f}% of assignments")
    return lines + [""]


def _coactivation_section(result: dict) -> list[str]:
    k = result["top_k"]
    lines = ["## Co-activation", "",
             f"N(Ei, Ej) / N(Ei) over all pairs of each token's top-{k} set (OLMoE Eq. 6); with "
             f"independent choices it would be about (k-1)/(E-1).", ""]
    for l in result["layers"]:
        pairs = ", ".join(f"E{p['experts'][0]}->E{p['experts'][1]} {p['ratio']:.2f}" for p in l["strongest_pairs"])
        base = (k - 1) / max(l["num_experts"] - 1, 1)
        lines.append(f"- layer {l['layer']}: strongest {pairs or 'none'} (independent: {base:.2f})")
        if l["transition"] is not None:
            follow = _followers(l)
            lines.append(f"  - into layer {l['next_layer']}: {follow}")
    return lines + [""]


def _followers(layer: dict) -> str:
    """Each expert's most likely companion in the next MoE layer, as P(j | i)."""
    chose = [max(row[i], 1) for i, row in enumerate(layer["coactivation"])]
    parts = []
    for i, row in enumerate(layer["transition"]):
        j = max(range(len(row)), key=row.__getitem__)
        parts.append(f"E{i}->E{j} {row[j] / chose[i]:.2f}")
    return ", ".join(parts)


def _vocab_section(result: dict) -> list[str]:
    lines = ["## Vocabulary specialisation", "",
             "Per layer: the mean share of a frequent token id's occurrences (seen >= 10 times) "
             "whose first choice is that id's most frequent expert. Per expert: the tokens with "
             "the highest lift P(expert | token) / P(expert).", ""]
    for l in result["layers"]:
        lines.append(f"### layer {l['layer']}: {_f(l['vocab_specialization'])} "
                     f"(chance {_f(l['vocab_specialization_chance'])}, {l['vocab_ids']} ids)")
        lines += ["", "| expert | load | top tokens by lift |", "|---|---|---|"]
        for e, toks in enumerate(l["top_tokens"]):
            shown = " ".join(f"`{_tok(t['token'])}` {t['lift']:.1f}" for t in toks[:TOP_TOKENS_SHOWN])
            lines.append(f"| {e} | {l['normalized_load'][e]:.2f} | {shown or '-'} |")
        lines.append("")
    return lines


def _category_section(result: dict) -> list[str]:
    cats = result["categories"]
    if not cats["names"]:
        return []
    kind = {"python": "Python token kind (from the tokenize module)"}.get(cats["kind"], f"source {cats['kind']}")
    counts = ", ".join(f"{n} {c:,}" for n, c in zip(cats["names"], cats["tokens"]) if c)
    lines = ["## Category specialisation", "",
             f"Category: {kind}. Tokens: {counts}.", "",
             "Share of each category's tokens routed to each expert (rows sum to k); the uniform "
             "rate is k/E. Mutual information is measured on the first "
             f"{result['layers'][0].get('category_mi_sample_tokens') or 0:,} tokens against 20 "
             "random permutations of their categories.", ""]
    for l in result["layers"]:
        lines.append(f"### layer {l['layer']}: {_category_verdict(l)}; I = "
                     f"{_f(l.get('category_mi_bits'), '.4f')} bits, shuffled "
                     f"{_f(l.get('category_mi_chance_bits'), '.4f')} +- "
                     f"{_f(l.get('category_mi_chance_std_bits'), '.4f')} bits "
                     f"({_f(l.get('category_mi_ratio'), '.1f', 'inf')}x)")
        E = l["num_experts"]
        lines += ["", "| category | " + " | ".join(f"E{e}" for e in range(E)) + " |",
                  "|---|" + "|".join("---" for _ in range(E)) + "|"]
        for name, share in l["category_share"].items():
            lines.append(f"| {_tok(name)} | " + " | ".join(f"{s:.2f}" for s in share) + " |")
        lines += ["", f"uniform rate k/E = {l['category_uniform']:.3f}", ""]
    return lines


def _ablation_section(result: dict) -> list[str]:
    abl = result.get("ablation")
    if abl is None:
        return ["## Expert ablation", "", "Skipped (--ablate none).", ""]
    lines = ["## Expert ablation", "",
             f"Each listed expert routed around (its weight set to 0, the token's other choices "
             f"renormalised as the layer does), scored on {abl['tokens']:,} tokens; base loss "
             f"{abl['base_loss']:.4f}. Specialists: below their fair share of traffic but costing at "
             "least twice the layer's median loss increase.", ""]
    for l in result["layers"]:
        cells = [f"E{e} {d:+.4f}" for e, d in enumerate(l["ablation_delta_loss"]) if d is not None]
        lines.append(f"- layer {l['layer']}: {', '.join(cells)}; specialists {l['specialists'] or 'none'}")
    return lines + [""]


def _saturation_section(result: dict) -> list[str]:
    if not result.get("against"):
        return []
    lines = ["## Router saturation", "",
             f"Same tokens routed by {result['against']}: share of first choices and of top-"
             f"{result['top_k']} assignments that agree (OLMoE 5.1).", ""]
    for l in result["layers"]:
        lines.append(f"- layer {l['layer']}: top-1 {l['saturation_top1']:.3f}, "
                     f"top-{result['top_k']} {l['saturation_topk']:.3f}")
    return lines + [""]


def _trace_section(result: dict) -> list[str]:
    t = result.get("trace")
    if not t:
        return []
    lines = ["## Trace", "", "| token | " + " | ".join(f"layer {l}" for l in t["layers"]) + " |",
             "|---|" + "|".join("---" for _ in t["layers"]) + "|"]
    for i, tok in enumerate(t["tokens"]):
        lines.append(f"| `{_tok(tok)}` | " + " | ".join(",".join(map(str, per[i])) for per in t["experts"]) + " |")
    return lines + [""]


def write_outputs(result: dict, out_dir: Path) -> str:
    """inspect.json, report.md and the PNGs into ``out_dir``; returns inspect.json's text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.draw_all(result, out_dir)
    text = json.dumps(result, indent=1) + "\n"
    write_text_atomic(out_dir / "inspect.json", text)
    write_text_atomic(out_dir / "report.md", render_markdown(result, figures))
    return text


def print_summary(result: dict, out_dir: Path, console) -> None:
    from rich.table import Table
    from moelab.inspect.trace import Trace, trace_lines
    headers, rows = summary_rows(result)
    table = Table(title=f"moelab inspect: {result['tokens']:,} tokens, top-{result['top_k']}")
    for h in headers:
        table.add_column(h, justify="left" if h.startswith(("category", "strongest")) else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    t = result.get("trace")
    if t:
        console.print("[bold]trace[/bold] (expert ids per MoE layer, first choice first)")
        for line in trace_lines(Trace(t["token_ids"], t["tokens"], t["layers"], t["experts"])):
            console.print(line, highlight=False)
    console.print(f"report: {out_dir / 'report.md'}  (inspect.json and PNG figures beside it)",
                  highlight=False)
