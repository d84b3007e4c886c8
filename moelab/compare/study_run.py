"""Running a study file: one compare, or one compare per variant, then the study's report.

A study without variants is an ordinary compare folder whose plan carries the study
(``compare.json`` ``study``). A study with variants is a folder holding ``study.json`` and one
compare folder per variant (``DIR/<variant>/``), each resumable on its own; ``DIR/report.md``
and ``DIR/results.json`` put the variants side by side. ``--resume DIR`` continues either kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from moelab.compare.plan import (
    ModelSpec, build_plan, check_budget_scale, headline_budget, load_plan, parse_budget,
    scale_budget, write_json, write_plan,
)
from moelab.compare.study import StudySpec, Variant
from moelab.config import ConfigError

STUDY_FILE = "study.json"
STUDY_VERSION = 1
DOMAINS_DIR = "domains"                    # the two-domain corpus: DIR/domains/{code,prose}/
DOMAINS_TOKENIZER = "domains-tokenizer.json"   # one BPE for every variant (outside the corpus)


def scaled_budgets(spec: StudySpec, scale: float) -> tuple[list, list[str]]:
    """The study's budgets times ``--budget-scale`` and their labels (the file's own text at 1)."""
    budgets = [parse_budget(t, "budget") for t in spec.budgets]
    if scale == 1.0:
        return budgets, list(spec.budgets)
    budgets = [scale_budget(b, scale) for b in budgets]
    labels = [b.label for b in budgets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--budget-scale {scale:g} makes the study's budgets {', '.join(spec.budgets)} "
                          f"collide ({', '.join(labels)}); use a larger scale")
    return budgets, labels


def domain_overrides(out_dir: Path, domain: Optional[str]) -> list[str]:
    if domain is None:
        return []
    root = (out_dir / DOMAINS_DIR).resolve()
    corpus = root if domain == "mix" else root / domain
    return [f"data.corpus={json.dumps(str(corpus))}",
            f"data.tokenizer={json.dumps(str(out_dir.resolve() / DOMAINS_TOKENIZER))}"]


def plan_study(spec: StudySpec, out_dir: Path, *, overrides: list[str], seeds: Optional[str],
               budget_scale: float, nproc: int, command: str) -> dict:
    """{variant name ("" without variants): compare plan}; every unit of every variant is
    validated before anything runs."""
    scale = check_budget_scale(budget_scale)
    budgets, labels = scaled_budgets(spec, scale)
    plans = {}
    for v in spec.variants or (Variant(""),):
        models = [ModelSpec(m.name, m.spec, (*m.overrides, *v.overrides, *domain_overrides(out_dir, v.domain)))
                  for m in spec.models if v.models is None or m.name in v.models]
        folder = out_dir / v.name if v.name else out_dir
        plan = build_plan(models, budgets, labels, seeds if seeds is not None else spec.seeds, spec.match,
                          overrides, folder, command, nproc=nproc, reference=spec.reference)
        plan["study"] = {**spec.public(), "variant": v.name or None, "budget_scale": scale}
        if v.domain is not None:
            plan["domain"] = v.domain
            plan["inspect_categories"] = "folder" if v.domain == "mix" else "auto"
        plans[v.name] = plan
    return plans


def write_study(plans: dict, spec_public: Optional[dict], out_dir: Path, command: str,
                load: Optional[list]) -> None:
    """Plans on disk: a plain compare folder, or study.json plus one compare folder per variant."""
    for name, plan in plans.items():
        plan.setdefault("load_average", load)
        write_plan(plan, out_dir / name if name else out_dir)
    if "" not in plans:
        write_json(out_dir / STUDY_FILE, {"version": STUDY_VERSION, "study": spec_public,
                                          "variants": list(plans), "command": command, "load_average": load,
                                          "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def is_study_folder(out_dir: Path) -> bool:
    return (out_dir / STUDY_FILE).is_file()


def load_study_plans(out_dir: Path) -> tuple[dict, dict]:
    """(study.json, {variant: plan}) of a study folder with variants."""
    try:
        meta = json.loads((out_dir / STUDY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{out_dir / STUDY_FILE}: not readable ({e})") from None
    if meta.get("version") != STUDY_VERSION:
        raise ConfigError(f"{out_dir / STUDY_FILE}: study version {meta.get('version')!r}, this moelab "
                          f"reads {STUDY_VERSION}; start a new study")
    plans = {}
    for name in meta["variants"]:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{out_dir / STUDY_FILE}: variant {name!r} does not name a folder inside it")
        plans[name] = load_plan(out_dir / name)
    return meta, plans


def prepare_domains(plans: dict, out_dir: Path, log: Callable[[str], None]) -> None:
    """Build the two-domain corpus and its one tokenizer (trained on the mix's training split)
    when a variant trains on it; both are kept for a resume."""
    if not any(p.get("domain") for p in plans.values()):
        return
    import dataclasses
    from moelab import resolve_config
    from moelab.data import prepare_data
    from moelab.data.domains import build_domains
    from moelab.fileio import write_text_atomic
    plan = next(p for p in plans.values() if p.get("domain"))
    args = plan["units"][0]["train_args"]            # ["--preset", spec, "--set", key=value, ...]
    cfg = resolve_config(args[1], args[3::2])
    root = out_dir / DOMAINS_DIR
    manifest = build_domains(root, cfg.data.max_bytes)
    log(f"two-domain corpus in {root}: code {manifest['code']['bytes'] / 1e6:.2f} MB "
        f"({manifest['code']['documents']} documents), prose {manifest['prose']['bytes'] / 1e6:.2f} MB "
        f"({manifest['prose']['documents']} documents)")
    tok_path = out_dir / DOMAINS_TOKENIZER
    if not tok_path.is_file():
        data = dataclasses.replace(cfg.data, corpus=str(root.resolve()), tokenizer=None)
        prep = prepare_data(data, cfg.model.vocab_size, log=lambda _m: None)
        write_text_atomic(tok_path, prep.tokenizer_json)
        log(f"one BPE for every variant, trained on the mix: {tok_path}")


def run_plan(plan: dict, folder: Path, *, show_progress, log, progress=None, extra_args: tuple[str, ...] = ()):
    """Train, measure and report one compare folder (``progress``: a ``moelab.progress.Progress``
    for the measuring and report phases; ``extra_args``: output options for every unit's train)."""
    from moelab.compare.measure import measure_units
    from moelab.compare.report import build_report
    from moelab.compare.run import run_units
    from moelab.progress import Progress
    run_units(plan, folder, show_progress=show_progress, log=log, extra_args=extra_args)
    headline = [u for u in plan["units"] if u["budget"] == headline_budget(plan)]
    progress = progress or Progress("compare", enabled=False, log=log)
    measure_units(folder, plan["units"], headline, log=log, categories=plan.get("inspect_categories", "auto"),
                  progress=progress.stage)
    with progress.phase("writing the report and plots"):
        return build_report(plan, folder)


def run_variants(plans: dict, out_dir: Path, *, show_progress, log, progress=None,
                 extra_args: tuple[str, ...] = ()) -> dict:
    prepare_domains(plans, out_dir, log)
    for name, plan in plans.items():
        log(f"variant {name}: {len(plan['units'])} training runs")
        run_plan(plan, out_dir / name, show_progress=show_progress, log=log, progress=progress,
                 extra_args=extra_args)
    from moelab.compare.study_report import build_study_report
    return build_study_report(plans, out_dir)
