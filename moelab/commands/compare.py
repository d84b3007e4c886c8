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
    p.add_argument("--seeds", default=str(DEFAULT_SEEDS), metavar="N",
                   help=f"train every model at N seeds (train.seed, +1, ...) or at a list (1,2,3); "
                        f"default {DEFAULT_SEEDS}")
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


def _new_plan(args) -> tuple[dict, Path]:
    from moelab.compare import DEFAULT_BUDGET, DEFAULT_MATCH
    from moelab.compare.plan import PLAN_FILE, build_plan, parse_budget, parse_budgets
    if args.budget is not None and args.budgets is not None:
        raise_user("give --budget (one budget) or --budgets (several), not both")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise_user("--models is empty: name at least one preset or config file")
    if args.budgets is not None:
        budgets = parse_budgets(args.budgets)
        texts = [b.label for b in budgets]
    else:
        text = args.budget or DEFAULT_BUDGET
        budgets, texts = [parse_budget(text)], [text]
    out_dir = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out_dir / PLAN_FILE).exists() and not args.dry_run:
        raise_user(f"{str(out_dir)!r} already holds a compare; use --resume {out_dir}")
    if args.from_run:                                   # upcycling arms (moelab.adapt.arms)
        from moelab.adapt.arms import continuation_plan
        if args.budgets is not None or args.nproc != 1 or args.match != DEFAULT_MATCH:
            raise_user("--from takes one --budget (extra tokens), one process and no --match")
        plan = continuation_plan(args.models, args.from_run, args.budget, args.seeds, args.overrides,
                                 out_dir, _command())
    else:
        plan = build_plan(models, budgets, texts, args.seeds, args.match, args.overrides, out_dir, _command(),
                          nproc=args.nproc)
    try:
        plan["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        plan["load_average"] = None
    return plan, out_dir


def _plan_options_given(args) -> list[str]:
    from moelab.compare import DEFAULT_MATCH, DEFAULT_MODELS, DEFAULT_SEEDS
    defaults = {"models": ",".join(DEFAULT_MODELS), "budget": None, "budgets": None,
                "seeds": str(DEFAULT_SEEDS), "match": DEFAULT_MATCH, "out": None, "overrides": [],
                "nproc": 1, "from_run": None}
    flags = {"overrides": "set", "from_run": "from"}
    return [f"--{flags.get(k, k)}" for k, v in defaults.items() if getattr(args, k) != v]


def run(args) -> int:
    global _sink
    _sink = message_sink(args)
    from moelab.compare.measure import measure_units
    from moelab.compare.plan import headline_budget, load_plan, write_plan
    from moelab.compare.report import build_report, print_tables
    from moelab.compare.run import CompareStopped, run_units
    from moelab.lock import FolderLock, FolderLockedError
    from moelab.progress import Progress
    from moelab.stop import EXIT_STOPPED
    from moelab.train.trackers import check_available, group_env

    if args.resume:
        given = _plan_options_given(args)
        if given:
            raise_user(f"--resume continues the plan stored in {args.resume}; drop {', '.join(given)}")
        out_dir = Path(args.resume)
        plan = load_plan(out_dir)
    else:
        plan, out_dir = _new_plan(args)
        tracker_sets = [o for o in args.overrides if o.split("=")[0].strip() == "train.trackers"]
        if tracker_sets:                   # a missing wandb/mlflow: say so now, not after unit 1's data
            from moelab.config import Config
            check_available(Config().with_overrides(tracker_sets).train.trackers)
    _log(f"compare: {', '.join(m['name'] for m in plan['models'])}; seeds {', '.join(map(str, plan['seeds']))}; "
         f"budget{'s' if len(plan['budgets']) > 1 else ''} {', '.join(plan['budgets'])}; "
         f"{len(plan['units'])} training runs; output {out_dir}")
    for line in plan["matching"]:
        _log("  " + line.replace("**", ""))
    if args.dry_run:
        for unit in plan["units"]:
            _log(f"  {unit['id']}: moelab train --out {unit['run_dir']} " + " ".join(shlex.quote(a) for a in unit["train_args"]))
        return 0
    try:
        lock = FolderLock(out_dir, "compare").acquire()     # one compare writes a folder at a time
    except FolderLockedError as e:
        raise_user(str(e))
    try:
        if not args.resume:
            write_plan(plan, out_dir)
        if plan.get("continuation"):                    # the upcycled folders its arms start from
            from moelab.adapt.arms import prepare_arms
            prepare_arms(plan, log=_log)
        # every unit is one run of one wandb group / MLflow experiment named after the compare
        os.environ.update(group_env(f"moelab-{out_dir.resolve().name}"))
        unit_output = (("--quiet",) if args.quiet else ()) + (("--log-file", args.log_file) if args.log_file else ())
        run_units(plan, out_dir, show_progress=False if args.no_progress or args.quiet else None, log=_log,
                  extra_args=unit_output)
        headline = [u for u in plan["units"] if u["budget"] == headline_budget(plan)]
        with Progress("compare", enabled=not args.quiet, log=_log) as progress:
            measure_units(out_dir, plan["units"], headline, log=_log, progress=progress.stage)
            with progress.phase("writing the report and plots"):
                rows, payload, verdicts = build_report(plan, out_dir)
    except CompareStopped as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    except RuntimeError as e:
        raise_user(str(e))
    finally:
        lock.release()
    print_tables(rows, payload, verdicts, out_dir)
    return 0
