"""A short inspection summary per sparse model, for reports that compare several runs
(``moelab compare``): load, dead experts, and the strongest specialisation found."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SUMMARY_TOKENS = 16384


def summary(run_dir: str | Path, *, tokens: int = SUMMARY_TOKENS, device: Optional[str] = "cpu",
            corpus: Optional[str] = None, progress=None) -> dict:
    """Route ``tokens`` held-out tokens of ``run_dir`` (no ablation, no files written) and
    summarise with :func:`summarize`. Raises InspectError for a dense run. ``progress``: a
    stage factory (``moelab.progress``) for the routing pass."""
    from moelab.inspect.analyze import InspectOptions, inspect_run
    opts = InspectOptions(tokens=tokens, ablate="none", device=device, corpus=corpus)
    return summarize(inspect_run(run_dir, opts) if progress is None else
                     inspect_run(run_dir, opts, progress=progress))


def summarize(result: dict) -> dict:
    """The headline numbers of an inspect.json dict."""
    layers = result["layers"]
    best = None
    for l in layers:
        s = l.get("strongest_category")
        if s and (best is None or s["vs_uniform"] > best["vs_uniform"]):
            best = {"layer": l["layer"], **s}
    vocab = [l["vocab_specialization"] for l in layers if l["vocab_specialization"] is not None]
    chance = [l["vocab_specialization_chance"] for l in layers if l["vocab_specialization_chance"] is not None]
    return {
        "tokens": result["tokens"],
        "moe_layers": len(layers),
        "experts": [l["num_experts"] for l in layers],
        "dead_experts": {str(l["layer"]): l["dead_experts"] for l in layers if l["dead_experts"]},
        "num_dead_experts": sum(len(l["dead_experts"]) for l in layers),
        "max_normalized_load": max(l["max_normalized_load"] for l in layers),
        "min_normalized_load": min(l["min_normalized_load"] for l in layers),
        "vocab_specialization": sum(vocab) / len(vocab) if vocab else None,
        "vocab_specialization_chance": sum(chance) / len(chance) if chance else None,
        "category_specialised_layers": sum(bool(l.get("category_specialised")) for l in layers),
        "strongest_category": best,
    }


def summary_markdown(s: dict, name: str = "") -> str:
    """A few markdown bullets of :func:`summarize`'s dict."""
    head = f"**{name}**: " if name else ""
    dead = (", ".join(f"layer {k}: {v}" for k, v in s["dead_experts"].items())
            if s["num_dead_experts"] else "none")
    lines = [f"- {head}{s['moe_layers']} MoE layers, {s['tokens']:,} held-out tokens routed; "
             f"normalised load {s['min_normalized_load']:.2f}-{s['max_normalized_load']:.2f} "
             f"(1 = balanced); dead experts: {dead}"]
    if s["vocab_specialization"] is not None:
        lines.append(f"  - vocabulary specialisation {s['vocab_specialization']:.2f} "
                     f"(chance {s['vocab_specialization_chance']:.2f}); layers more category-"
                     f"specialised than chance: {s['category_specialised_layers']}/{s['moe_layers']}")
    b = s["strongest_category"]
    if b:
        lines.append(f"  - strongest specialisation: layer {b['layer']} expert {b['expert']} takes "
                     f"{b['share']:.0%} of {b['category']!r} tokens ({b['vs_uniform']:.2f}x the uniform rate)")
    return "\n".join(lines)
