"""The "what this search shows" sentences, computed from results.json's numbers alone: what the
search found, where the best pattern puts its experts, whether it beats the fixed patterns beyond
seed noise (compare's paired rule), what the search's own lead was worth at fresh seeds, the
Pareto fronts, speed and parameter importances."""

from __future__ import annotations

import math
import statistics
from typing import Optional

EARLY, LATE = 0.4, 0.6       # MoE-layer centroid (0 = first layer, 1 = last) below / above: early / late


def pareto_front(rows: list[dict], key: str, higher_is_better: bool) -> list[int]:
    """Trial numbers no other complete trial beats on both validation loss and ``key``, by
    increasing ``key``."""
    done = [r for r in rows if r["state"] == "complete" and r.get(key) is not None
            and r.get("duplicate_of") is None]
    sign = -1 if higher_is_better else 1
    front = []
    for r in done:
        dominated = any(o is not r and o["val_loss"] <= r["val_loss"] and sign * o[key] <= sign * r[key]
                        and (o["val_loss"] < r["val_loss"] or sign * o[key] < sign * r[key]) for o in done)
        if not dominated:
            front.append(r["number"])
    return sorted(front, key=lambda n: next(r[key] for r in done if r["number"] == n))


def placement(moe_layers: list[int], n_layers: int) -> str:
    """'all-dense', 'all-MoE', or where the MoE layers sit: early, late or spread (centroid)."""
    if not moe_layers:
        return "all-dense"
    if len(moe_layers) == n_layers:
        return "all-MoE"
    if n_layers < 2:
        return "spread"
    centroid = statistics.mean(moe_layers) / (n_layers - 1)
    return "early" if centroid < EARLY else "late" if centroid > LATE else "spread"


def _arch(r: dict) -> str:
    if not r["moe_layers"]:
        return "all-dense"
    return (f"MoE in layers {r['moe_layers']} with {r['experts_per_layer']} routed experts, each token sent "
            f"to {r['top_k']} of them (granularity {r['granularity']}), {r['shared_experts']} shared, expert "
            f"width {r['expert_hidden']} ({r['expert_width_fraction']:.2f} of the dense FFN)")


def _scope(p: dict, rows: list[dict]) -> str:
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    dev = max((abs(r["active_params"] / p["target_active_params"] - 1) for r in rows), default=0.0)
    dups = [r for r in done if r.get("duplicate_of") is not None]
    done = [r for r in done if r.get("duplicate_of") is None]
    text = (f"{len(done) + len(pruned) + len(p['failed'])} of {p['trials_requested']} trials: {len(done)} "
            f"trained to the budget, {len(pruned)} pruned")
    if pruned:
        text += f" (at steps {', '.join(str(r['pruned_at_step']) for r in sorted(pruned, key=lambda r: r['number']))} of {p['steps_per_run']})"
    if p["failed"]:
        text += f", {len(p['failed'])} not trained (" + "; ".join(f"#{f['number']}: {f['reason']}" for f in p["failed"][:3]) + ")"
    if dups:
        numbers = ", ".join(f"#{r['number']}" for r in dups)
        text += (f"; besides, TPE proposed an already trained model {len(dups)} time(s) ({numbers}): "
                 f"those reused its result, trained nothing and do not count")
    return text + (f". Every trained candidate is within {100 * dev:.2f}% of the budget's "
                   f"{p['target_active_params']:,} active parameters.")


def _layer_shares(rows: list[dict], n_layers: int) -> Optional[str]:
    done = sorted((r for r in rows if r["state"] == "complete" and r.get("duplicate_of") is None),
                  key=lambda r: r["value"])
    if len(done) < 4:
        return None
    top = done[:max(2, math.ceil(len(done) / 4))]

    def share(group, i):
        return sum(i in r["moe_layers"] for r in group) / len(group)

    cells = ", ".join(f"layer {i} {share(top, i):.0%} (all {share(done, i):.0%})" for i in range(n_layers))
    return (f"Share of MoE per layer among the best quarter of complete trials ({len(top)} of {len(done)}), "
            f"against all complete trials: {cells}.")


def _fixed_lines(rt: dict) -> list[str]:
    """The fixed patterns against each other at the same seeds: their order, and MoE in the last
    half against the first half (compare's paired rule), the early-or-late question itself."""
    from moelab.compare import stats
    pats = {x["name"]: x for x in rt["patterns"]}
    for x in rt["patterns"]:
        for alias in x["also"]:
            pats[alias] = x
    fixed = [x for x in rt["patterns"] if x["name"] != "best"]
    order = sorted(fixed, key=lambda x: x["val_loss"])
    lines = ["Fixed patterns by mean loss at the retrain's seeds: "
             + ", ".join(f"{x['name']} {x['val_loss']:.4f}" for x in order)
             + f" (each against all-dense: {rt['report']})."]
    late, early = pats.get("last-half"), pats.get("first-half")
    if late and early and late is not early and len(rt["seeds"]) >= 2:
        gaps = [a - b for a, b in zip(late["val_loss_seeds"], early["val_loss_seeds"])]
        v = stats.judge(gaps, "seeds")
        word = {"ahead": "late is better", "behind": "early is better"}.get(v.verdict, "neither is better")
        lines.append(f"MoE in the last half against MoE in the first half (fixed patterns, same expert "
                     f"settings): loss gap last - first {v.gap:+.4f} over seeds "
                     f"({', '.join(f'{g:+.4f}' for g in gaps)}), threshold {v.threshold:.4f}: "
                     f"**{v.verdict}** ({word} beyond seed noise).")
    return lines


def _retrain_lines(p: dict) -> list[str]:
    rt = p.get("retrain")
    if not rt:
        return ["The best pattern was not retrained (--retrain-seeds 0 or the search is not finished), "
                "so there is no verdict against the fixed patterns."]
    lines = []
    best = next(x for x in rt["patterns"] if x["name"] == "best")
    measure = "validation loss" if rt["measure"] == "val_loss" else "validation loss at equal training time"
    n = len(rt["seeds"])
    sd = f" ± {best['val_loss_sd']:.4f}" if best["val_loss_sd"] is not None else ""
    lines.append(f"Retrained at fresh seeds {', '.join(map(str, rt['seeds']))}, the best pattern scores "
                 f"{best['val_loss']:.4f}{sd} against {p['best']['val_loss']:.4f} in the search "
                 f"({best['val_loss'] - p['best']['val_loss']:+.4f}: it was picked as the lowest of "
                 f"{sum(r['state'] == 'complete' and r.get('duplicate_of') is None for r in p['trials'])} "
                 f"noisy losses, so part of its "
                 f"search lead is the luck of its seed).")
    words = []
    for v in rt["verdicts"]:
        if v["verdict"] == "same model":
            words.append(f"{v['against']}: the same model as the best")
            continue
        also = f" (= {', '.join(v['also'])})" if v.get("also") else ""
        thr = f", threshold {v['threshold']:.4f}" if v.get("threshold") is not None else ""
        words.append(f"{v['against']}{also}: gap {v['gap']:+.4f}{thr}, **{v['verdict']}**")
    lines.append(f"Best against each fixed pattern on {measure} (paired over {n} seed(s); negative = the "
                 f"best is lower; {rt['rule']}): " + "; ".join(words) + ".")
    lines += _fixed_lines(rt)
    judged = [v for v in rt["verdicts"] if v["verdict"] != "same model"]
    ahead = [v["against"] for v in judged if v["verdict"] == "ahead"]
    if judged and len(ahead) == len(judged):
        lines.append(f"The best pattern beats every fixed pattern beyond seed noise at this budget ({n} seeds).")
    elif judged:
        not_ahead = [f"{v['against']} ({v['verdict']})" for v in judged if v["verdict"] != "ahead"]
        lines.append("The best pattern does **not** beat every fixed pattern beyond seed noise: not ahead of "
                     + ", ".join(not_ahead) + (f"; ahead of {', '.join(ahead)}" if ahead else "") + ".")
    return lines


def _pruned_line(rows: list[dict], best: dict) -> Optional[str]:
    """How far behind the best trial each pruned trial was at its last reported evaluation."""
    at = {int(c[0]): c[3] for c in best.get("val_curve") or []}
    gaps = []
    for r in rows:
        if r["state"] == "pruned" and r["val_curve"] and int(r["val_curve"][-1][0]) in at:
            step, loss = int(r["val_curve"][-1][0]), r["val_curve"][-1][3]
            gaps.append((r["number"], step, loss - at[step]))
    if not gaps:
        return None
    return ("Pruned trials against the best trial at the evaluation they were last judged on: "
            + ", ".join(f"#{n} {g:+.3f} at step {s}" for n, s, g in gaps) + " (nats; the pruner compares "
            "trials at equal steps, so these are the gaps it acted on).")


def _speed_line(rows: list[dict]) -> Optional[str]:
    done = [r for r in rows if r["tokens_per_s"] and r.get("duplicate_of") is None]   # pruned runs measured too
    dense = [r["tokens_per_s"] for r in done if not r["moe_layers"]]
    sparse = [r["tokens_per_s"] for r in done if r["moe_layers"]]
    if not sparse:
        return None
    text = (f"Training speed (complete and pruned trials): trials with MoE layers ran at median "
            f"{statistics.median(sparse):,.0f} tokens/s")
    if dense:
        text += (f", all-dense trials at {statistics.median(dense):,.0f} "
                 f"({statistics.median(sparse) / statistics.median(dense):.2f}x)")
    fastest = max(done, key=lambda r: r["tokens_per_s"])
    slowest = min(done, key=lambda r: r["tokens_per_s"])
    return text + (f"; the fastest trial #{fastest['number']} ({fastest['tokens_per_s']:,.0f}), the slowest "
                   f"#{slowest['number']} ({slowest['tokens_per_s']:,.0f}, {len(slowest['moe_layers'])} MoE layers, "
                   f"{sum(slowest['experts_per_layer'])} routed experts). Tokens/s is measured on a shared "
                   f"machine: the load average is in the header.")


def all_findings(p: dict) -> list[str]:
    rows, n_layers = p["trials"], p["n_layers"]
    lines = [_scope(p, rows)]
    done = sorted((r for r in rows if r["state"] == "complete" and r.get("duplicate_of") is None),
                  key=lambda r: r["value"])
    if not done:
        return lines + ["No trial finished: nothing to report on."]
    b = p["best"]
    what = "validation loss" if p["objective"] == "loss" else "validation loss at the base model's time"
    text = f"Best trial #{b['number']} ({what} {b['value']:.4f}): {_arch(b)}."
    if len(done) >= 2:
        r2 = done[1]
        text += (f" Runner-up #{r2['number']} {r2['value']:.4f} ({r2['value'] - b['value']:+.4f}); complete "
                 f"trials span {done[0]['value']:.4f}-{done[-1]['value']:.4f}.")
    lines.append(text)
    where = placement(b["moe_layers"], n_layers)
    lines.append({"all-dense": "The best pattern has no MoE layer: at this budget no sparse layout the "
                               "search tried beat the dense model.",
                  "all-MoE": "The best pattern makes every layer MoE.",
                  }.get(where, f"The best pattern puts its experts **{where}**: MoE in layers {b['moe_layers']} "
                               f"of 0-{n_layers - 1}."))
    shares = _layer_shares(rows, n_layers)
    if shares:
        lines.append(shares)
    pruned = _pruned_line(rows, b)
    if pruned:
        lines.append(pruned)
    lines += _retrain_lines(p)
    for key, words in (("total_params", "total parameters"), ("tokens_per_s", "measured tokens/s")):
        front = p["pareto"][key]
        lines.append(f"Pareto front of validation loss against {words}: trials "
                     + ", ".join(f"#{n}" for n in front) + ".")
    speed = _speed_line(rows)
    if speed:
        lines.append(speed)
    imp = p.get("importances") or {}
    if imp.get("values"):
        top = list(imp["values"].items())[:3]
        lines.append(f"Parameter importances ({imp['evaluator']} over {imp['trials']} complete trials, "
                     f"parameters every one of them has): " + ", ".join(f"{k} {v:.2f}" for k, v in top)
                     + ". With this few trials they rank, they do not measure.")
    elif imp.get("note"):
        lines.append(f"Parameter importances: {imp['note']}")
    if len(p["seeds"]) == 1:
        lines.append("Each trial trained at one seed: the search itself cannot tell apart trials closer "
                     "than the seed noise" + (f" (the retrain's seed sd of the best is "
                                              f"{next(x for x in p['retrain']['patterns'] if x['name'] == 'best')['val_loss_sd']:.4f})"
                                              if p.get("retrain") and len(p["retrain"]["seeds"]) >= 2 else "")
                     + "; its ranking is a shortlist, the retrain is the test.")
    return lines
