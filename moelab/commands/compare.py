"""`moelab compare`: the Dense vs MoE vs Hybrid-MoE study on your hardware and data."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from moelab.commands import raise_user


def add_parser(sub) -> None:
    from moelab.compare import DEFAULT_BUDGET, DEFAULT_MODELS
    p = sub.add_parser("compare", help="train Dense, MoE and Hybrid models under one budget and report")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated presets or config TOML files (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--budget", default=DEFAULT_BUDGET,
                   help=f"per model: tokens ('2M', '500k') or time ('10m', '90s'); default {DEFAULT_BUDGET}")
    p.add_argument("--out", help="report folder (default runs/compare-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted compare; finished models are kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every model, e.g. --set model.n_layers=2")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.compare.report import build_report, print_table
    from moelab.compare.run import load_plan, plan_compare, run_compare

    command = "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("moelab") \
        else "moelab compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if args.resume:
        out_dir = Path(args.resume)
        plan = load_plan(out_dir)
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise_user("--models is empty: name at least one preset or config file")
        out_dir = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out_dir / "compare.json").exists():
            raise_user(f"{str(out_dir)!r} already holds a compare; use --resume {out_dir}")
        plan = plan_compare(models, args.budget, args.overrides, out_dir, command)
    print(f"compare: {', '.join(m['name'] for m in plan['models'])}; budget {plan['budget']} per model; "
          f"output {out_dir}", flush=True)
    try:
        run_compare(plan, out_dir, show_progress=False if args.no_progress else None)
    except RuntimeError as e:
        raise_user(str(e))
    results, _, lines = build_report(plan, out_dir)
    print_table(results, lines, out_dir)
    return 0
