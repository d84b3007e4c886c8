"""The table of docs/routers.md from a `moelab compare` folder:
python docs/routers/study_table.py DIR [MODEL_A:MODEL_B ...].

Per model: mean ± sd validation loss over seeds, the paired gap to the reference with the
threshold the compare's t-test needed and its verdict, training tokens/s (mean ± sd) and its
ratio to the reference's (mean of the per-seed ratios: each seed's units ran back to back), and,
from each run's metrics.jsonl, the routing it ended with (last 50 logged steps, all MoE layers):
active experts per token and the share of tokens with none (variable routers), load CV.
Each MODEL_A:MODEL_B pair is judged by compare's own rule on the per-seed gaps A - B (the same
seeds, so the same initial-weight seeds and batch order). Last, the paired gap to the reference
at a quarter, half, three quarters and all of the budget (from the runs' evaluations).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def tail_routing(run: Path, last: int = 50) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    layers = [layer for r in [r for r in recs if r["kind"] == "train"][-last:] for layer in r.get("router", [])]
    out = {"load_cv": statistics.mean(layer["load_cv"] for layer in layers)}
    if layers and "active_experts_mean" in layers[0]:
        out["active"] = statistics.mean(layer["active_experts_mean"] for layer in layers)
        out["zero"] = statistics.mean(layer["zero_expert_fraction"] for layer in layers)
    return out


def main(folder: str, pairs: list[str]) -> None:
    root = Path(folder)
    res = json.loads((root / "results.json").read_text())
    ref = res["reference"]
    models = {m["name"]: m for m in res["models"]}
    comp = {(c["model"], c["measure"]): c for c in res["comparisons"]}
    ref_tps = models[ref]["tokens_per_s_seeds"]
    print(f"seeds {res['seeds']}, budget {res['budget']}, reference {ref}; t = {res['noise']['t']:.2f}; "
          f"load at start {res['load_average_at_start']}, at report {res['load_average_at_report']}")
    print()
    print("| model | val loss (mean ± sd) | gap to " + ref + " (paired) | verdict | at equal time | "
          "tokens/s (mean ± sd) | vs " + ref + " | routing at the end |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        c, t = comp.get((name, "val_loss")), comp.get((name, "val_loss_at_equal_time"))
        gap = "reference" if c is None else f"{c['gap']:+.4f} (threshold ±{c['threshold']:.4f})"
        verdict = "-" if c is None else c["verdict"]
        eq_time = "-" if t is None else f"{t['gap']:+.4f}, {t['verdict']}"
        ratios = [a / b for a, b in zip(m["tokens_per_s_seeds"], ref_tps)]
        routing = [tail_routing(root / "runs" / Path(d).name) for d in m["run_dirs"]]
        parts = [f"load CV {statistics.mean(r['load_cv'] for r in routing):.2f}"]
        if "active" in routing[0]:
            parts.append(f"{statistics.mean(r['active'] for r in routing):.2f} experts/token, "
                         f"{100 * statistics.mean(r['zero'] for r in routing):.1f}% with none")
        print(f"| {name} | {m['val_loss']:.4f} ± {m['val_loss_sd']:.4f} | {gap} | {verdict} | {eq_time} | "
              f"{m['tokens_per_s']:,.0f} ± {m['tokens_per_s_sd']:,.0f} | "
              f"{statistics.mean(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}) | {'; '.join(parts)} |")


    if pairs:
        from moelab.compare.stats import judge
        print()
        print("| pair | gap A - B (paired) | threshold | verdict |")
        print("|---|---|---|---|")
        for pair in pairs:
            a, b = pair.split(":")
            gaps = [x - y for x, y in zip(models[a]["val_loss_seeds"], models[b]["val_loss_seeds"])]
            v = judge(gaps, "seeds")
            print(f"| {a} vs {b} | {v.gap:+.4f} | ±{v.threshold:.4f} | A {v.verdict} |")


def eval_curve(run: Path) -> dict[int, float]:
    """Validation loss by tokens seen, from the run's evaluations."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["tokens"]: r["val_loss"] for r in recs if r["kind"] == "eval"}


def convergence(folder: str, fractions=(0.25, 0.5, 0.75, 1.0)) -> None:
    """Paired gap to the reference at fractions of the budget (the evaluation nearest each): how
    fast each model gets where it gets, the convergence-speed claims (expert choice)."""
    from moelab.compare.stats import judge
    root = Path(folder)
    res = json.loads((root / "results.json").read_text())
    ref = res["reference"]
    models = {m["name"]: m for m in res["models"]}
    curves = {name: [eval_curve(root / "runs" / Path(d).name) for d in m["run_dirs"]] for name, m in models.items()}
    steps = sorted(set.intersection(*(set(c) for cs in curves.values() for c in cs)))
    picks = [min(steps, key=lambda t: abs(t - f * steps[-1])) for f in fractions]
    print()
    print("| model | " + " | ".join(f"gap at {t:,} tokens" for t in picks) + " |")
    print("|---|" + "---|" * len(picks))
    for name in models:
        if name == ref:
            continue
        cells = []
        for t in picks:
            v = judge([a[t] - b[t] for a, b in zip(curves[name], curves[ref])], "seeds")
            cells.append(f"{v.gap:+.3f} (±{v.threshold:.3f}) {v.verdict}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    convergence(sys.argv[1])
