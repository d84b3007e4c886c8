"""The best pattern retrained at several seeds beside the fixed patterns, at the same budget, by
`moelab compare` itself: the patterns are written as config files in ``DIR/retrain/models/`` and
compared (``--match active``, the all-dense pattern as reference) in ``DIR/retrain``, an ordinary
compare folder (its own report.md; ``moelab compare --resume DIR/retrain`` continues it). The
verdicts "best against each fixed pattern" apply compare's paired rule (``analysis.compare``) with
the fixed pattern as reference.

Fresh seeds: the best trial was picked as the lowest of many noisy losses, so its own seed's loss
is biased low (the winner's curse). The retrain uses the seeds after the search's
(``train.seed + search seeds``, +1, ...), none of which chose the winner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from moelab.config import Config
from moelab.fileio import write_text_atomic
from moelab.search.candidate import Candidate, counts, describe_row, fixed_patterns, size

RETRAIN_DIR = "retrain"


def candidate_of(arch: dict, n_layers: int) -> Candidate:
    if not arch["moe_layers"]:
        return Candidate((), (), 1)
    return Candidate(tuple(arch["moe_layers"]), tuple(arch["experts_per_layer"]), arch["top_k"],
                     arch["granularity"], arch["shared_experts"])


def patterns(base: Config, best_arch: dict, target: int) -> list[tuple[str, Candidate, Config, list[str]]]:
    """(name, candidate, sized config, other names of the same model) in training order: the best,
    then the fixed patterns. Patterns that come out as the same model (e.g. every-other and
    last-half at 2 layers, or a best that is a fixed pattern) are trained once, under the first
    name. Compare's reference is the first dense model: the all-dense pattern (or the best, if it
    is all-dense)."""
    order = [("best", candidate_of(best_arch, base.model.n_layers)), *fixed_patterns(base.model).items()]
    out: list[tuple[str, Candidate, Config, list[str]]] = []
    for name, cand in order:
        sized = size(base, cand, target)
        twin = next((row for row in out if row[2] == sized), None)
        if twin is not None:
            twin[3].append(name)
        else:
            out.append((name, cand, sized, []))
    return out


def _model_files(rows) -> tuple[dict[str, str], list[str]]:
    """Config files for compare, by name; and the ``key=none`` overrides they need."""
    from moelab.search.tomlfile import config_toml
    files, nones = {}, None
    for name, cand, cfg, aliases in rows:
        text, none_overrides = config_toml(cfg)
        head = (f"# {name}" + (f" (also {', '.join(aliases)})" if aliases else "")
                + f": layers [{describe_row(cand, cfg.model.n_layers)}] ('.' dense, else routed experts), "
                f"written by moelab search\n")
        files[name] = head + text
        nones = none_overrides if nones is None else nones
    return files, nones or []


def retrain(out_dir: Path, base: Config, best_arch: dict, target: int, budget_text: str, seeds: list[int],
            measure: str, log: Callable[[str], None] = print, *, train: bool = True) -> Optional[dict]:
    """Train (or continue) the retrain compare and return its summary for the search report:
    per pattern its losses over seeds, and the paired verdict of the best against each fixed
    pattern on ``measure`` ("val_loss", or "val_loss_at_equal_time" for --objective loss_at_time).
    ``train=False`` only reads back a retrain that is complete (None otherwise)."""
    from moelab.compare.measure import load_measurement, measure_units
    from moelab.compare.plan import PLAN_FILE, build_plan, load_plan, parse_budget, write_plan
    from moelab.compare.report import build_report
    from moelab.compare.run import UnitState, run_units, unit_state
    folder = out_dir / RETRAIN_DIR
    rows = patterns(base, best_arch, target)
    files, nones = _model_files(rows)
    if (folder / PLAN_FILE).is_file():
        plan = load_plan(folder)
        for name, text in files.items():
            path = folder / "models" / f"{name}.toml"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                raise RuntimeError(f"{folder} retrained other patterns ({path.name} differs from the "
                                   f"study's {name}); move that folder aside to retrain these")
    elif not train:
        return None
    else:
        (folder / "models").mkdir(parents=True, exist_ok=True)
        specs = []
        for name, text in files.items():
            write_text_atomic(folder / "models" / f"{name}.toml", text)     # a link there is replaced
            specs.append(str(folder / "models" / f"{name}.toml"))
        # compare takes a list of two or more seeds, or a count from train.seed
        seeds_text, overrides = (",".join(map(str, seeds)), nones) if len(seeds) >= 2 else \
            ("1", nones + [f"train.seed={seeds[0]}"])
        plan = build_plan(specs, [parse_budget(budget_text, "--budget-per-trial")], [budget_text],
                          seeds_text, "active", overrides, folder,
                          f"moelab search (retrain of the best pattern beside the fixed ones, {out_dir})")
        write_plan(plan, folder)
    if train:
        log(f"retrain: {', '.join(r[0] for r in rows)} at seeds {', '.join(map(str, plan['seeds']))}, "
            f"{budget_text} tokens each ({len(plan['units'])} runs, in {folder})")
        run_units(plan, folder, show_progress=False, log=log)
        # inference (prefill, decode) on the first seed's weights only: the search is about training
        # loss, and one seed's timing rounds already judge speed in compare's report
        first = [u for u in plan["units"] if u["seed"] == plan["seeds"][0]]
        measure_units(folder, plan["units"], first, log=log)
        build_report(plan, folder)
    elif any(unit_state(u["run_dir"]) is not UnitState.FINISHED
             or "val_batch_losses" not in load_measurement(folder, u) for u in plan["units"]):
        return None
    return _summary(plan, folder, rows, budget_text, measure)


def _summary(plan: dict, folder: Path, rows, budget_text: str, measure: str) -> dict:
    from moelab.compare import stats
    from moelab.compare.analysis import compare as judge_pair, read_study
    study = read_study(plan, folder)
    by_name = study.by_budget[study.headline]
    out_patterns = []
    for name, cand, cfg, aliases in rows:
        m = by_name[name]
        total, active = counts(cfg)
        out_patterns.append({
            "name": name, "also": aliases, **cand.public(), "row": describe_row(cand, cfg.model.n_layers),
            "expert_hidden": cfg.model.moe.expert_hidden if not cand.dense else None,
            "ffn_hidden": cfg.model.ffn_hidden, "active_params": active, "total_params": total,
            "val_loss": m.mean("val_loss"), "val_loss_sd": m.sd("val_loss"), "val_loss_seeds": m.seeds_of("val_loss"),
            "val_loss_at_equal_time_seeds": m.seeds_of("val_loss_at_equal_time"),
            "tokens_per_s": m.mean("tokens_per_s"), "tokens_per_s_seeds": m.seeds_of("tokens_per_s"),
        })
    best = by_name["best"]
    verdicts = [{"against": alias, "verdict": "same model"} for alias in rows[0][3]]
    for name, _cand, _cfg, aliases in rows[1:]:
        c = judge_pair(best, by_name[name], measure)
        if c is not None:
            verdicts.append({"against": name, "also": aliases, "measure": measure, "paired_gaps": c.gaps,
                             **c.verdict.public()})
    best_aliases = rows[0][3]
    return {"seeds": plan["seeds"], "budget": budget_text, "measure": measure, "patterns": out_patterns,
            "verdicts": verdicts, "best_is_also": best_aliases, "report": f"{RETRAIN_DIR}/report.md",
            "rule": stats.rule_text(),
            "t": stats.t_critical(len(plan["seeds"]) - 1) if len(plan["seeds"]) >= 2 else None}
