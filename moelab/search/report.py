"""The search's outputs: results.json (every trial, the best with its retrain, the Pareto fronts,
the parameter importances, the findings), report.md with its figures, and the terminal summary.
Everything is read from the study (so a report covers every worker's trials) and from the retrain
folder."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional

from moelab.decode_bench import cpu_name
from moelab.search import plots
from moelab.search.candidate import TOLERANCE
from moelab.search.findings import all_findings, pareto_front
from moelab.search.retrain import candidate_of
from moelab.search.study import BEYOND

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned"}


def trial_rows(study, n_layers: int, target: int) -> tuple[list[dict], list[dict], list[int]]:
    """(one row per complete or pruned trial, failed trials with their reason, running trial numbers)."""
    from moelab.search.candidate import describe_row
    rows, failed, running = [], [], []
    for t in study.get_trials(deepcopy=False):
        name = t.state.name
        if name == "RUNNING":
            running.append(t.number)
            continue
        if name == "FAIL":
            reason = t.user_attrs.get("fail_reason", "failed")
            if not reason.startswith(BEYOND):
                failed.append({"number": t.number, "reason": reason})
            continue
        if name not in STATE_NAMES or "arch" not in t.user_attrs:
            continue
        arch, res = t.user_attrs["arch"], t.user_attrs.get("result", {})
        cand = candidate_of(arch, n_layers)
        rows.append({
            "number": t.number, "state": STATE_NAMES[name],
            "moe_layers": arch["moe_layers"], "experts_per_layer": arch["experts_per_layer"],
            "row": describe_row(cand, n_layers),
            "top_k": arch["top_k"], "granularity": arch["granularity"], "shared_experts": arch["shared_experts"],
            "expert_hidden": arch["expert_hidden"], "ffn_hidden": arch["ffn_hidden"],
            "expert_width_fraction": None if arch["expert_hidden"] is None else arch["expert_hidden"] / arch["ffn_hidden"],
            "active_params": arch["active_params"], "total_params": arch["total_params"],
            "active_ratio": arch["active_params"] / target,
            "tokens_per_s": res.get("tokens_per_s"),
            "val_loss": res.get("val_loss") if name == "COMPLETE" else None,
            "value": t.value if name == "COMPLETE" else None,
            "val_loss_at_time": res.get("val_loss_at_time"),
            "val_loss_seeds": res.get("val_loss_seeds"),
            "steps": res.get("steps") if name == "COMPLETE" else res.get("pruned_at_step"),
            "pruned_at_step": res.get("pruned_at_step"),
            "train_time_s": res.get("train_time_s"),
            "duplicate_of": res.get("duplicate_of"),
            "run_dirs": res.get("run_dirs", []),
            "val_curve": res.get("val_curve", []),
            "params": t.params,
            "worker": t.user_attrs.get("worker", {}).get("host"),
            "worker_out_dir": t.user_attrs.get("worker", {}).get("out_dir"),
        })
    return rows, failed, running


def importances(study) -> dict:
    """Optuna's parameter importances over the parameters every complete trial has: fANOVA
    (Hutter et al. 2014; needs scikit-learn), else PED-ANOVA (Watanabe et al. 2023). Trials that
    reused another's result are left out (a repeated point would weigh twice)."""
    import optuna
    from optuna.trial import TrialState
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if (t.user_attrs.get("result") or {}).get("duplicate_of") is None]
    complete = len(trials)
    if complete < 3:
        return {"values": {}, "evaluator": None, "trials": complete,
                "note": f"not computed: {complete} complete trial(s), at least 3 needed"}
    import importlib.util
    if importlib.util.find_spec("sklearn") is not None:
        evaluator, name = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    else:
        evaluator, name = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    distinct = optuna.create_study(direction="minimize")        # in memory: the distinct trials only
    distinct.add_trials(trials)
    try:
        values = optuna.importance.get_param_importances(distinct, evaluator=evaluator)
    except (ValueError, RuntimeError) as e:
        return {"values": {}, "evaluator": name, "trials": complete, "note": f"not computed: {e}"}
    return {"values": {k: float(v) for k, v in values.items()}, "evaluator": name, "trials": complete}


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine(out_dir: Path, rows: list[dict]) -> dict:
    from moelab.fileio import JSONFileError, read_json_object
    root = out_dir.resolve()
    for r in rows:
        for d in r["run_dirs"]:
            # run folders come from the shared study (any worker, any machine): only this search
            # folder's own runs are read
            meta = (out_dir / d / "run_meta.json").resolve()
            if root not in meta.parents or not meta.is_file():
                continue
            try:
                m = read_json_object(meta)
                return {"machine": m["machine"], "processor": m.get("processor", ""), "device": m["device"],
                        "torch": m["torch"]}
            except (OSError, JSONFileError, KeyError):
                continue
    import torch
    return {"machine": platform.platform(), "processor": platform.processor(), "device": "cpu",
            "torch": torch.__version__}


def build(study, settings: dict, out_dir: Path, retrain: Optional[dict]) -> dict:
    """Write results.json, report.md and the figures; returns the results payload."""
    import optuna
    from moelab.compare.plan import write_json
    from moelab.search.study import public_url, storage_url
    n_layers, target = settings["n_layers"], settings["target_active_params"]
    rows, failed, running = trial_rows(study, n_layers, target)
    complete = [r for r in rows if r["state"] == "complete"]
    best = None
    if complete:
        b = min(complete, key=lambda r: r["value"])
        best = dict(b)
        if retrain:
            rb = next(x for x in retrain["patterns"] if x["name"] == "best")
            best.update(val_loss_seeds=rb["val_loss_seeds"], retrain_val_loss=rb["val_loss"],
                        retrain_val_loss_sd=rb["val_loss_sd"], retrain_seeds=retrain["seeds"],
                        retrain_verdicts=retrain["verdicts"], search_val_loss_seeds=b["val_loss_seeds"])
        else:
            best.update(val_loss_seeds=None, search_val_loss_seeds=b["val_loss_seeds"])
    payload = {
        "command": settings["command"], "base": settings["base"] or "dense",
        "overrides": settings["overrides"], "budget": settings["budget"],
        "budget_tokens": settings["budget_tokens"], "steps_per_run": settings["steps_per_run"],
        "trials_requested": settings["trials"], "seeds": settings["seeds"],
        "objective": settings["objective"], "sampler": "TPE", "pruner": settings["pruner"],
        "study": settings["study"], "storage": public_url(storage_url(settings, out_dir)),
        "space": settings["space"], "n_layers": n_layers, "target_active_params": target,
        "tolerance": TOLERANCE, "reference_tokens_per_s": study.user_attrs.get("reference_tokens_per_s"),
        "trials": rows, "failed": failed, "running": running, "best": best,
        "pareto": {"total_params": pareto_front(rows, "total_params", False),
                   "tokens_per_s": pareto_front(rows, "tokens_per_s", True)},
        "importances": importances(study),
        "retrain": retrain,
        **_machine(out_dir, rows), "cpu": cpu_name(), "python": platform.python_version(),
        "optuna": optuna.__version__,
        "load_average_at_start": settings.get("load_average"), "load_average_at_report": _load_average(),
    }
    payload["findings"] = all_findings(payload) if not running else \
        [f"Trials {running} are still running (here or in another worker): this is an interim report."] + all_findings(payload)
    figures = []
    if rows:
        figures += [plots.patterns(rows, n_layers, out_dir), plots.history(rows, settings["objective"], out_dir)]
    if complete:
        figures += [plots.pareto(rows, "total_params", payload["pareto"]["total_params"], out_dir),
                    plots.pareto(rows, "tokens_per_s", payload["pareto"]["tokens_per_s"], out_dir)]
    for extra in (plots.retrain(retrain, out_dir) if retrain else None, plots.importances(payload["importances"], out_dir)):
        if extra is not None:
            figures.append(extra)
    payload["figures"] = [p.name for p in figures]
    write_json(out_dir / "results.json", payload)
    from moelab.fileio import write_text_atomic
    write_text_atomic(out_dir / "report.md", markdown(payload))
    return payload


def _f(v, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


def _trial_table(p: dict) -> str:
    head = ("| # | state | layers | top-k | gran. | shared | expert width | active | total | tokens/s | val loss "
            + ("| @ base time " if p["objective"] == "loss_at_time" else "") + "|")
    rule = "|" + "---|" * (11 + (p["objective"] == "loss_at_time"))
    body = []
    order = sorted(p["trials"], key=lambda r: (r["state"] != "complete", r["value"] if r["value"] is not None else 0,
                                               r["number"]))
    for r in order:
        loss = _f(r["val_loss"], "{:.4f}") if r["state"] == "complete" else f"pruned at step {r['pruned_at_step']}"
        dense = not r["moe_layers"]
        cells = [f"{r['number']}" + (f" (= #{r['duplicate_of']})" if r.get("duplicate_of") is not None else ""),
                 r["state"], f"`{r['row']}`", "-" if dense else str(r["top_k"]),
                 "-" if dense else str(r["granularity"]), "-" if dense else str(r["shared_experts"]),
                 "-" if dense else f"{r['expert_hidden']} ({r['expert_width_fraction']:.2f})",
                 f"{r['active_params'] / 1e6:.3f}M ({100 * (r['active_ratio'] - 1):+.2f}%)",
                 f"{r['total_params'] / 1e6:.3f}M", _f(r["tokens_per_s"], "{:,.0f}"), loss]
        if p["objective"] == "loss_at_time":
            cells.append(_f(r["val_loss_at_time"], "{:.4f}"))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def _retrain_table(rt: dict) -> str:
    head = "| pattern | layers | active | total | val loss (mean ± sd) | seeds | tokens/s | best vs it |"
    rule = "|---|---|---|---|---|---|---|---|"
    verdicts = {v["against"]: v for v in rt["verdicts"]}
    body = []
    for x in rt["patterns"]:
        v = verdicts.get(x["name"])
        cell = "-" if x["name"] == "best" else (
            "same model" if v is None or v["verdict"] == "same model" else f"{v['gap']:+.4f} {v['verdict']}")
        name = x["name"] + (f" (= {', '.join(x['also'])})" if x["also"] else "")
        body.append(f"| {name} | `{x['row']}` | {x['active_params'] / 1e6:.3f}M | {x['total_params'] / 1e6:.3f}M | "
                    f"{_f(x['val_loss'], '{:.4f}')}{_f(x['val_loss_sd'], ' ± {:.4f}')} | "
                    + ", ".join(_f(s, "{:.4f}") for s in x["val_loss_seeds"])
                    + f" | {_f(x['tokens_per_s'], '{:,.0f}')} | {cell} |")
    return "\n".join([head, rule, *body])


def markdown(p: dict) -> str:
    figs = "\n".join(f"![{name}]({name})" for name in p["figures"])
    findings = "\n".join(f"- {line}" for line in p["findings"])
    space = p["space"]
    rt = p.get("retrain")
    retrain = "Not retrained (--retrain-seeds 0, or the study is not finished)." if not rt else (
        f"The best pattern and the fixed ones, each sized to the same active parameters, retrained by "
        f"`moelab compare` at seeds {', '.join(map(str, rt['seeds']))} (fresh: none of them picked the best) "
        f"for {rt['budget']} tokens; verdicts are the best against each pattern on "
        f"{'validation loss' if rt['measure'] == 'val_loss' else 'validation loss at equal training time'}, "
        f"paired over seeds. The full compare report: [{rt['report']}]({rt['report']}).\n\n" + _retrain_table(rt))
    imp = p["importances"]
    imp_text = ("\n".join(f"| {k} | {v:.3f} |" for k, v in imp["values"].items()) if imp.get("values") else "")
    imp_md = (f"{imp['evaluator']} over {imp['trials']} complete trials (parameters present in all of them):\n\n"
              f"| parameter | importance |\n|---|---|\n{imp_text}") if imp_text else imp.get("note", "")
    return f"""# moelab search: which layers are MoE, and how big their experts are

Command: `{p['command']}`
Base model: {p['base']}{' with ' + ', '.join(f'`{o}`' for o in p['overrides']) if p['overrides'] else ''}; budget {p['target_active_params']:,} active parameters (every candidate resized to it, within {p['tolerance']:.0%}).
Trials: {p['trials_requested']} asked, {p['budget_tokens']:,} tokens each ({p['steps_per_run']} steps) at seed(s) {', '.join(map(str, p['seeds']))}; sampler {p['sampler']}, pruner {p['pruner']}; objective `{p['objective']}`{f" (base model {p['reference_tokens_per_s']:,.0f} tokens/s)" if p['reference_tokens_per_s'] else ''}.
Study: `{p['study']}` in `{p['storage']}`; Optuna {p['optuna']}.
Machine: {p['cpu']} ({p['machine']}, {p['device']}), torch {p['torch']}; load average at start {p['load_average_at_start']}, at the report {p['load_average_at_report']} (shared machine: tokens/s move with it).

Space: MoE layers {space['moe_layers']}; experts {space['experts']} ({'per MoE layer' if space['per_layer_experts'] else 'one count per trial'}); top-k {space['top_k']}; granularity {space['granularity']}; shared experts {space['shared_experts']}.

## Trials

Layers: one cell per layer, `.` a dense FFN, a number the routed experts of an MoE layer. Expert
width is the routed (and shared) expert hidden size, with its fraction of the dense FFN width.
Active parameters are relative to the budget.

{_trial_table(p)}

## Best pattern retrained beside the fixed patterns

{retrain}

## Parameter importances

{imp_md}

## What this search shows

{findings}

## Figures

{figs}
"""


def print_summary(p: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"moelab search: {len(p['trials'])} trials, {p['budget_tokens']:,} tokens each")
    for h in ("#", "state", "layers", "active", "total", "tokens/s", "val loss"):
        table.add_column(h, justify="left" if h in ("state", "layers") else "right")
    done = sorted((r for r in p["trials"] if r["state"] == "complete"), key=lambda r: r["value"])
    for r in done[:10] + [r for r in p["trials"] if r["state"] == "pruned"][:5]:
        table.add_row(str(r["number"]), r["state"], r["row"], f"{r['active_params'] / 1e6:.3f}M",
                      f"{r['total_params'] / 1e6:.3f}M", _f(r["tokens_per_s"], "{:,.0f}"),
                      _f(r["val_loss"], "{:.4f}") if r["state"] == "complete" else f"pruned @{r['pruned_at_step']}")
    console.print(table)
    console.print("[bold]What this search shows[/bold]")
    for line in p["findings"]:
        console.print(f" - {line.replace('**', '')}", highlight=False)
    console.print(f"report: {out_dir / 'report.md'}  (results.json and PNG figures beside it)")
