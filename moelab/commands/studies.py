"""`moelab studies`: the bundled study files, the question each asks and how long it took."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("studies", help="list the bundled studies (run one with `moelab compare --study NAME`)")
    p.add_argument("--json", action="store_true", help="print each study's name, question, claim and file as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.compare.study import bundled_dir, load_study, study_names
    specs = [load_study(bundled_dir() / f"{name}.toml") for name in study_names()]
    if args.json:
        print(json.dumps([{"name": s.name, "question": s.question, "claim": s.claim, "file": s.path,
                           "models": [m.name for m in s.models], "variants": [v.name for v in s.variants],
                           "budgets": list(s.budgets), "seeds": s.seeds, "measured": s.measured}
                          for s in specs], indent=2))
        return 0
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name:<{width}}  {s.question}")
        print(f"{'':<{width}}  claim: {s.claim['text']} ({s.claim['source']})")
        runs = len(s.models) * (len(s.variants) or 1)
        print(f"{'':<{width}}  {runs} models x {s.seeds} seeds x {', '.join(s.budgets)}"
              + (f"; measured: {s.measured}" if s.measured else ""))
    print("run one with: moelab compare --study NAME [--out DIR] [--budget-scale X]")
    return 0
