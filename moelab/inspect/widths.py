"""Heterogeneous experts (HMoE, Wang et al. 2024): which kinds of tokens the router sends to the
wide experts and which to the narrow ones, and what a token really costs under that routing.

Legend: C categories, E experts.

HMoE's premise is that easy tokens can take a narrow expert and hard ones a wide one. Per layer
and token category this reports the mean width of the experts the category's tokens ran on and
the share of its assignments that went to wide experts (wider than the median width); and, for any
model whose active parameters the config can only give as an expectation (heterogeneous widths,
ReLU routing, expert choice), the active parameters and FLOPs per token under the routing
measured on these held-out tokens (:func:`moelab.accounting.measured_active`).
"""

from __future__ import annotations

import numpy as np

from moelab.accounting import active_basis, measured_active
from moelab.config import VARIABLE_ROUTER_KINDS, Config


def needs_measured_active(cfg: Config) -> bool:
    m = cfg.model.moe
    return m.heterogeneous or m.router in VARIABLE_ROUTER_KINDS


def measured_active_section(cfg: Config, kept_by_layer: dict[int, list[int]], tokens: int, seq_len: int) -> dict:
    """Active parameters and FLOPs per token from the measured loads, beside the config's figure."""
    from moelab.accounting import describe
    info = describe(cfg.model, seq_len=seq_len)
    got = measured_active(cfg.model, kept_by_layer, tokens, seq_len)
    return {"config_active_params": info["active_params"], "config_flops_per_token": info["flops_per_token"],
            "config_basis": active_basis(cfg.model), **got}


def width_section(widths_E: list[int], cat_CE: np.ndarray, kept_E: np.ndarray,
                  names: tuple[str, ...]) -> dict:
    """One layer: the mean width per assignment overall and per category, and the share of each
    category's assignments on the wide experts (width > the median width)."""
    widths = np.asarray(widths_E, dtype=np.float64)
    wide = widths > np.median(widths)
    out = {"widths": [int(w) for w in widths_E], "wide_experts": [int(e) for e in np.nonzero(wide)[0]],
           "mean_width": float((kept_E * widths).sum() / max(kept_E.sum(), 1)),
           "wide_share": float(kept_E[wide].sum() / max(kept_E.sum(), 1)),
           "categories": {}}
    for c, name in enumerate(names):
        counts = cat_CE[c].astype(np.float64)
        if counts.sum() == 0:
            continue
        out["categories"][name] = {"assignments": int(counts.sum()),
                                   "mean_width": float((counts * widths).sum() / counts.sum()),
                                   "wide_share": float(counts[wide].sum() / counts.sum())}
    return out


def markdown(result: dict) -> list[str]:
    """report.md sections: measured active parameters, and wide vs narrow experts by category."""
    lines: list[str] = []
    act = result.get("active_measured")
    if act:
        lines += ["## Active parameters under the measured routing", "",
                  f"- config: {act['config_active_params']:,} active parameters, "
                  f"{act['config_flops_per_token']:,} FLOPs per token ({act['config_basis']})",
                  f"- measured: {act['active_params']:,} active parameters, {act['flops_per_token']:,} "
                  f"FLOPs per token ({act['basis']})", ""]
    layers = [l for l in result["layers"] if l.get("widths")]
    if not layers:
        return lines
    lines += ["## Wide and narrow experts", "",
              "Mean width of the experts each category's tokens ran on, and the share of its "
              "assignments on the wide experts (wider than the median width).", ""]
    for l in layers:
        w = l["widths"]
        lines.append(f"### layer {l['layer']}: widths {w['widths']}; overall mean width "
                     f"{w['mean_width']:.1f}, {100 * w['wide_share']:.1f}% of assignments on wide experts")
        ranked = sorted(w["categories"].items(), key=lambda kv: -kv[1]["mean_width"])
        if ranked:
            lines += ["", "| category | assignments | mean width | on wide experts |", "|---|---|---|---|"]
            lines += [f"| {name} | {c['assignments']:,} | {c['mean_width']:.1f} | {100 * c['wide_share']:.1f}% |"
                      for name, c in ranked]
        lines.append("")
    return lines
