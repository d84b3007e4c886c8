"""`moelab compare`: the Dense vs MoE vs Hybrid-MoE study on your hardware and data."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from moelab.commands import add_output_args, message_sink, raise_user


def add_parser(sub) -> None:
    from moelab.compare import DEFAULT_BUDGET, DEFAULT_MATCH, DEFAULT_MODELS, DEFAULT_SEEDS
    from moelab.compare.matching import MATCH_MODES
    p = sub.add_parser("compare", help="train Dense, MoE and Hybrid models over seeds and budgets, and report")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated presets or config TOML files (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--budget", default=None,
                   help=f"per model and seed: tokens ('2M', '500k') or time ('10m', '90s'); default {DEFAULT_BUDGET}")
    p.add_argument("--budgets", default=None, metavar="B1,B2,...",
                   help="several token budgets (e.g. 250k,500k,1M): one run per model, seed and budget, "
                        "then a fit of loss against tokens and the crossover budgets")
    p.add_argument("--seeds", default=None, metavar="N",
                   help=f"train every model at N seeds (train.seed, +1, ...) or at a list (1,2,3); "
                        f"default {DEFAULT_SEEDS} (a study's own count with --study)")
    p.add_argument("--study", metavar="FILE.toml",
                   help="run a study file (models, budgets, seeds, matching, the question and the claim "
                        "it tests): a path, or the name of a bundled study (see `moelab studies`)")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                   help="multiply every budget by X (e.g. 4 to run a study longer on faster hardware)")
    p.add_argument("--match", default=DEFAULT_MATCH, choices=MATCH_MODES,
                   help=f"size the models to equal active, total or both parameter counts "
                        f"(none: as configured); default {DEFAULT_MATCH}")
    p.add_argument("--out", help="report folder (default runs/compare-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted compare; finished units are kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every model, e.g. --set model.n_layers=2")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train every model on N processes of this machine (torchrun; see "
                        "`moelab train --nproc`); layouts come from --set parallel.*")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (units, sizes, matching) and stop before training")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")
    # upcycling arms (planned by moelab.adapt.arms): continue a finished dense run as dense and upcycled
    p.add_argument("--from", dest="from_run", metavar="RUN",
                   help="continue the finished dense RUN for --budget extra tokens as each arm of "
                        "--models: dense,upcycle:E=8,K=2,method=drop (a scratch MoE of each shape is "
                        "added); see docs/upcycle.md")
    add_output_args(p)
    p.set_defaults(func=run)


_sink = None          # --quiet / --log-file (message_sink), set by run()


def _log(message: str) -> None:
    if _sink is not None:
        _sink(message)
    else:
        print(message, flush=True)


def _command() -> str:
    if sys.argv[0].endswith("moelab"):
        return "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "moelab compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])


def _load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _check_new_folder(out_dir: Path, dry_run: bool) -> None:
    from moelab.compare.plan import PLAN_FILE
    from moelab.compare.study_run import STUDY_FILE
    if not dry_run and ((out_dir / PLAN_FILE).exists() or (out_dir / STUDY_FILE).exists()):
        raise_user(f"{str(out_dir)!r} already holds a compare; use --resume {out_dir}")
    if not dry_run and out_dir.is_dir() and any(out_dir.iterdir()):
        raise_user(f"--out {str(out_dir)!r} already exists and is not empty: a new compare needs a new "
                   "or empty folder (its reports and runs would land beside, or over, what is there)")
    if out_dir.exists() and not out_dir.is_dir():
        raise_user(f"--out {str(out_dir)!r} exists and is not a folder")


def _new_plan(args) -> tuple[dict, Path]:
    from moelab.compare import DEFAULT_BUDGET, DEFAULT_MATCH, DEFAULT_SEEDS
    from moelab.compare.plan import build_plan, check_budget_scale, parse_budget, parse_budgets, scale_budget
    if args.budget is not None and args.budgets is not None:
        raise_user("give --budget (one budget) or --budgets (several), not both")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise_user("--models is empty: name at least one preset or config file")
    scale = check_budget_scale(args.budget_scale)
    if args.budgets is not None:
        budgets = [scale_budget(b, scale) for b in parse_budgets(args.budgets)]
        texts = [b.label for b in budgets]
    else:
        text = args.budget or DEFAULT_BUDGET
        budgets = [scale_budget(parse_budget(text), scale)]
        texts = [text if scale == 1.0 else budgets[0].label]
    out_dir = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_new_folder(out_dir, args.dry_run)
    seeds = args.seeds or DEFAULT_SEEDS
    if args.from_run:                                   # upcycling arms (moelab.adapt.arms)
        from moelab.adapt.arms import continuation_plan
        if args.budgets is not None or args.nproc != 1 or args.match != DEFAULT_MATCH or scale != 1.0:
            raise_user("--from takes one --budget (extra tokens), one process, no --match and no --budget-scale")
        plan = continuation_plan(args.models, args.from_run, args.budget, seeds, args.overrides, out_dir,
                                 _command())
    else:
        plan = build_plan(models, budgets, texts, seeds, args.match, args.overrides, out_dir, _command(),
                          nproc=args.nproc)
    plan["load_average"] = _load_average()
    return plan, out_dir


def _new_study(args) -> tuple[dict, Path]:
    from moelab.compare.study import find_study, load_study
    from moelab.compare.study_run import plan_study
    given = [f"--{_FLAGS.get(k, k)}" for k in ("models", "budget", "budgets", "match", "from_run") if _given(args, k)]
    if given:
        raise_user(f"--study {args.study}: the study file sets the models, budgets and matching; drop "
                   f"{', '.join(given)} (use --budget-scale to train longer, --seeds and --set to change the rest)")
    spec = load_study(find_study(args.study))
    out_dir = Path(args.out or f"runs/study-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_new_folder(out_dir, args.dry_run)
    plans = plan_study(spec, out_dir, overrides=args.overrides, seeds=args.seeds, budget_scale=args.budget_scale,
                       nproc=args.nproc, command=_command())
    return plans, out_dir


_DEFAULTS = {"budget": None, "budgets": None, "seeds": None, "out": None, "overrides": [], "nproc": 1,
             "study": None, "budget_scale": 1.0, "from_run": None}
_FLAGS = {"overrides": "set", "from_run": "from"}       # option names where they differ from the dest


def _given(args, key: str) -> bool:
    from moelab.compare import DEFAULT_MATCH, DEFAULT_MODELS
    default = {"models": ",".join(DEFAULT_MODELS), "match": DEFAULT_MATCH, **_DEFAULTS}[key]
    return getattr(args, key) != default


def _plan_options_given(args) -> list[str]:
    keys = ["models", "match", *_DEFAULTS]
    return [f"--{_FLAGS.get(k, k.replace('_', '-'))}" for k in keys if _given(args, k)]


def _unit_config(unit: dict):
    """A unit's Config from its stored `moelab train` arguments (--preset/--config, or
    --init-from RUN whose config it continues, then --set ...); None for a unit that starts from a
    folder the compare has not written yet (an upcycled arm: the run it came from is checked)."""
    from moelab import resolve_config
    from moelab.config import Config
    from moelab.runfolder import read_config
    args, spec, init_from, overrides = unit["train_args"], None, None, []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in ("--preset", "--config"):
            spec = value
        elif flag == "--init-from":
            init_from = value
        elif flag == "--set":
            overrides.append(value)
    if spec is not None:
        return resolve_config(spec, overrides)
    if init_from is not None:
        if not Path(init_from).exists():
            return None
        return read_config(init_from).with_overrides([o for o in overrides if not o.startswith("model.")])
    return Config().with_overrides(overrides)


def _not_built_yet(cfg, out_dir: Path) -> bool:
    """A corpus or tokenizer the compare builds itself inside its folder (a study's two-domain
    corpus) before its first unit trains: checked on a --resume, once it exists."""
    inside = out_dir.resolve()
    for value in (cfg.data.corpus, cfg.data.tokenizer):
        if value and value != "stdlib" and not Path(value).exists() and inside in Path(value).resolve().parents:
            return True
    return False


def _check_measurable(plan: dict, out_dir: Path) -> None:
    """Every unit's validation split must hold the windows compare scores after training (the
    trainer checks its own, but not the inference prompts), so a too-short split is refused
    before hours of training rather than in scoring, on every --resume again."""
    from moelab.compare.measure import PROMPTS, prompt_tokens
    from moelab.data import DataError, prepare_data
    seen = set()
    for unit in plan["units"]:
        cfg = _unit_config(unit)
        if cfg is None or _not_built_yet(cfg, out_dir):
            continue
        key = (repr(cfg.data), cfg.model.vocab_size, cfg.model.max_seq_len, cfg.train.seq_len)
        if key in seen:
            continue
        seen.add(key)
        try:
            val = len(prepare_data(cfg.data, cfg.model.vocab_size, log=lambda _m: None).val_tokens)
        except DataError as e:
            raise_user(f"{unit['id']}: {e}")
        need = max(prompt_tokens(cfg.model), cfg.train.seq_len) + 1
        if val < need:
            raise_user(f"{unit['id']}: the validation split holds {val:,} tokens, fewer than the "
                       f"{need:,} compare scores each model on ({PROMPTS} prompts of "
                       f"{prompt_tokens(cfg.model)} tokens, windows of train.seq_len = "
                       f"{cfg.train.seq_len}); use more data (data.max_bytes, data.val_fraction)")


def run(args) -> int:
    global _sink
    _sink = message_sink(args)
    from moelab.compare.plan import load_plan
    from moelab.compare.report import print_answer, print_tables
    from moelab.compare.run import CompareStopped
    from moelab.compare.study_run import is_study_folder, load_study_plans, run_plan, run_variants, write_study
    from moelab.lock import FolderLock, FolderLockedError
    from moelab.progress import Progress
    from moelab.stop import EXIT_STOPPED
    from moelab.train.trackers import check_available, group_env

    if args.resume:
        given = _plan_options_given(args)
        if given:
            raise_user(f"--resume continues the plan stored in {args.resume}; drop {', '.join(given)}")
        out_dir = Path(args.resume)
        plans = load_study_plans(out_dir)[1] if is_study_folder(out_dir) else {"": load_plan(out_dir)}
    else:
        if args.study:
            plans, out_dir = _new_study(args)
        else:
            plan, out_dir = _new_plan(args)
            plans = {"": plan}
        tracker_sets = [o for o in args.overrides if o.split("=")[0].strip() == "train.trackers"]
        if tracker_sets:                   # a missing wandb/mlflow: say so now, not after unit 1's data
            from moelab.config import Config
            check_available(Config().with_overrides(tracker_sets).train.trackers)
    for name, plan in plans.items():
        folder = out_dir / name if name else out_dir
        _log(f"compare{f' [{name}]' if name else ''}: {', '.join(m['name'] for m in plan['models'])}; seeds "
             f"{', '.join(map(str, plan['seeds']))}; budget{'s' if len(plan['budgets']) > 1 else ''} "
             f"{', '.join(plan['budgets'])}; {len(plan['units'])} training runs; output {folder}")
        for line in plan["matching"]:
            _log("  " + line.replace("**", ""))
        if args.dry_run:
            for unit in plan["units"]:
                _log(f"  {unit['id']}: moelab train --out {folder / unit['run_dir']} "
                     + " ".join(shlex.quote(a) for a in unit["train_args"]))
    if args.dry_run:
        return 0
    for plan in plans.values():             # before any unit trains (and on every --resume)
        _check_measurable(plan, out_dir)
    try:
        lock = FolderLock(out_dir, "compare").acquire()     # one compare writes a folder at a time
    except FolderLockedError as e:
        raise_user(str(e))
    try:
        if not args.resume:
            first = next(iter(plans.values()))
            write_study(plans, first.get("study"), out_dir, first["command"], _load_average())
        for plan in plans.values():
            if plan.get("continuation"):                # the upcycled folders its arms start from
                from moelab.adapt.arms import prepare_arms
                prepare_arms(plan, log=_log)
        # every unit is one run of one wandb group / MLflow experiment named after the compare
        os.environ.update(group_env(f"moelab-{out_dir.resolve().name}"))
        unit_output = (("--quiet",) if args.quiet else ()) + (("--log-file", args.log_file) if args.log_file else ())
        show_progress = False if args.no_progress or args.quiet else None
        with Progress("compare", enabled=not args.quiet, log=_log) as progress:
            if "" in plans:
                rows, payload, verdicts = run_plan(plans[""], out_dir, show_progress=show_progress, log=_log,
                                                   progress=progress, extra_args=unit_output)
            else:
                payload = run_variants(plans, out_dir, show_progress=show_progress, log=_log,
                                       progress=progress, extra_args=unit_output)
    except CompareStopped as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    except RuntimeError as e:
        raise_user(str(e))
    finally:
        lock.release()
    if "" in plans:
        print_tables(rows, payload, verdicts, out_dir)
    else:
        print_answer(payload["study"])
        print(f"report: {out_dir / 'report.md'}  (results.json, figures and one compare folder per variant beside it)")
    return 0
