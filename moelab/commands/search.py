"""`moelab search`: which layers are MoE and how big their experts are, searched with Optuna under a
fixed active-parameter budget; resumable, and shared by several processes or machines through one
Optuna storage."""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from pathlib import Path

from moelab.commands import add_config_args, raise_user

DEFAULT_BASE = "dense"
DEFAULT_BUDGET = "200k"
DEFAULT_TRIALS = 30
DEFAULT_RETRAIN_SEEDS = 3
MAX_SEEDS = 16
MAX_TRIALS = 10**6


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search which layers are MoE and how big their experts are (Optuna), "
                                      "at a fixed active-parameter budget")
    add_config_args(p)
    p.add_argument("--budget-per-trial", default=DEFAULT_BUDGET, metavar="TOKENS",
                   help=f"training tokens per trial and seed ('200k', '1M'); default {DEFAULT_BUDGET}")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, metavar="N",
                   help=f"trials in the study, over all its workers; default {DEFAULT_TRIALS}")
    p.add_argument("--space", metavar="FILE.toml", help="narrow or widen the search space (docs/search.md)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (sqlite:///search.db, "
                                                     "postgresql://user:pw@host/db); default DIR/search.db")
    p.add_argument("--study", default=None, metavar="NAME", help="study name in the storage (default moelab-search)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per trial (default 1)")
    p.add_argument("--retrain-seeds", type=int, default=DEFAULT_RETRAIN_SEEDS, metavar="N",
                   help=f"retrain the best pattern beside the fixed ones at N fresh seeds (0: skip); "
                        f"default {DEFAULT_RETRAIN_SEEDS}")
    p.add_argument("--objective", default="loss", choices=("loss", "loss_at_time"),
                   help="final validation loss, or the loss at the base model's wall-clock for the budget")
    p.add_argument("--pruner", default="hyperband", choices=("hyperband", "sh", "median", "none"),
                   help="prune trials on their validation losses at each evaluation (default hyperband)")
    p.add_argument("--out", help="search folder (default runs/search-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue a search (or join it as one more worker)")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume: rewrite the report from the study as it stands; train nothing")
    p.add_argument("--dry-run", action="store_true", help="print the settings, the space and the fixed "
                                                          "patterns' sizes, and stop before training")
    p.set_defaults(func=run)


def _log(message: str) -> None:
    print(message, flush=True)


def _command() -> str:
    if sys.argv[0].endswith("moelab"):
        return "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "moelab search " + " ".join(shlex.quote(a) for a in sys.argv[2:])


def new_settings(args) -> tuple[dict, Path]:
    """Every input checked before any trial: base config, budget, space, counts, storage name."""
    from moelab import resolve_config
    from moelab.compare.plan import parse_budget
    from moelab.search.candidate import check_space, fixed_patterns, size, target_of
    from moelab.search.space import DEFAULT_SPACE, load_space
    from moelab.search.study import DEFAULT_STUDY, SETTINGS_FILE, SETTINGS_VERSION
    if args.preset and args.config:
        raise_user("give --preset or --config, not both")
    spec = args.config or args.preset or DEFAULT_BASE
    base = resolve_config(spec, args.overrides).validate_for_training()
    budget = parse_budget(args.budget_per_trial, "--budget-per-trial")
    if budget.tokens is None:
        raise_user(f"--budget-per-trial = {args.budget_per_trial!r} is invalid: give tokens ('200k', '1M'); "
                   f"trials are compared at equal tokens (--objective loss_at_time scores them at equal time)")
    if not 1 <= args.trials <= MAX_TRIALS:
        raise_user(f"--trials = {args.trials} is invalid: must be between 1 and {MAX_TRIALS:,}")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise_user(f"--seeds = {args.seeds} is invalid: must be between 1 and {MAX_SEEDS}")
    if not 0 <= args.retrain_seeds <= MAX_SEEDS:
        raise_user(f"--retrain-seeds = {args.retrain_seeds} is invalid: must be between 0 and {MAX_SEEDS}")
    if args.storage is not None and "://" not in args.storage:
        raise_user(f"--storage = {args.storage!r} is invalid: give a database URL such as "
                   f"sqlite:///search.db or postgresql://user:password@host/db")
    if args.study is not None and not args.study.strip():
        raise_user("--study is empty: give a name")
    n_layers = base.model.n_layers
    space = load_space(args.space, n_layers) if args.space else DEFAULT_SPACE
    target = target_of(base)
    check_space(base, space, target)
    for name, cand in fixed_patterns(base.model).items():
        size(base, cand, target)                           # refuse a base the retrain cannot size
    t = base.train
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    steps = math.ceil(budget.tokens / tokens_per_step)
    out_dir = Path(args.out or f"runs/search-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out_dir / SETTINGS_FILE).exists() and not args.dry_run:
        raise_user(f"{str(out_dir)!r} already holds a search; use --resume {out_dir} (it also joins a "
                   f"search another process is running there)")
    if not args.dry_run and out_dir.is_dir() and any(out_dir.iterdir()):
        raise_user(f"--out {str(out_dir)!r} already exists and is not empty: a new search needs a new "
                   "or empty folder (its reports and trials would land beside, or over, what is there)")
    if out_dir.exists() and not out_dir.is_dir():
        raise_user(f"--out {str(out_dir)!r} exists and is not a folder")
    seed = t.seed
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    settings = {
        "version": SETTINGS_VERSION, "command": _command(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "base": spec, "overrides": list(args.overrides), "base_config": base.to_dict(),
        "budget": args.budget_per_trial, "budget_tokens": budget.tokens, "steps_per_run": steps,
        "trials": args.trials, "space": space.public(), "space_file": args.space,
        "storage": args.storage, "study": args.study or DEFAULT_STUDY,
        "seeds": [seed + i for i in range(args.seeds)],
        "retrain_seeds": [seed + args.seeds + i for i in range(args.retrain_seeds)],
        "objective": args.objective, "pruner": args.pruner, "n_layers": n_layers,
        "target_active_params": target, "load_average": load,
    }
    return settings, out_dir


def _options_given(args) -> list[str]:
    defaults = {"preset": None, "config": None, "overrides": [], "budget_per_trial": DEFAULT_BUDGET,
                "trials": DEFAULT_TRIALS, "space": None, "storage": None, "study": None, "seeds": 1,
                "retrain_seeds": DEFAULT_RETRAIN_SEEDS, "objective": "loss", "pruner": "hyperband", "out": None}
    return ["--" + ("set" if k == "overrides" else k.replace("_", "-"))
            for k, v in defaults.items() if getattr(args, k) != v]


def run(args) -> int:
    from moelab.search import require_optuna
    require_optuna()                                          # before anything else: exit 2 naming the extra
    from moelab.search.driver import SearchError, run_search, write_report
    from moelab.search.study import load_settings, public_url, storage_url, write_settings

    if args.report_only and not args.resume:
        raise_user("--report-only rewrites the report of an existing search: give --resume DIR")
    if args.resume:
        given = _options_given(args)
        if given:
            raise_user(f"--resume continues the search stored in {args.resume}; drop {', '.join(given)}")
        out_dir = Path(args.resume)
        settings = load_settings(out_dir)
    else:
        settings, out_dir = new_settings(args)
    _log(f"search: {settings['trials']} trials of {settings['budget_tokens']:,} tokens "
         f"({settings['steps_per_run']} steps) on {settings['base']}, {settings['target_active_params']:,} "
         f"active parameters each; study {settings['study']!r} in {public_url(storage_url(settings, out_dir))}; "
         f"output {out_dir}")
    if args.dry_run:
        _dry_run(settings)
        return 0
    if not args.resume:
        write_settings(settings, out_dir)
    try:
        if args.report_only:
            return write_report(settings, out_dir, log=_log)
        return run_search(settings, out_dir, log=_log)
    except SearchError as e:
        raise_user(str(e))


def _dry_run(settings: dict) -> None:
    from moelab import resolve_config
    from moelab.search.candidate import counts, describe_row, fixed_patterns, size
    from moelab.search.space import space_from_dict
    base = resolve_config(settings["base"], settings["overrides"])
    space = space_from_dict(settings["space"], settings["n_layers"])
    _log(f"  space: {space.describe()}")
    _log(f"  trial seeds {settings['seeds']}; retrain seeds {settings['retrain_seeds']}; objective "
         f"{settings['objective']}; pruner {settings['pruner']}")
    for name, cand in fixed_patterns(base.model).items():
        cfg = size(base, cand, settings["target_active_params"])
        total, active = counts(cfg)
        _log(f"  fixed pattern {name:<12} [{describe_row(cand, base.model.n_layers)}]: {active:,} active, "
             f"{total:,} total")
