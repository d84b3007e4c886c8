"""`moelab presets`: list the named configs and what each follows."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list presets")
    p.add_argument("--json", action="store_true", help="print a JSON list of preset names")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.presets import preset_description, preset_names
    names = preset_names()
    if args.json:
        print(json.dumps(names))
        return 0
    width = max(map(len, names))
    for name in names:
        text = preset_description(name)
        head = text.split(": ", 1)[-1]
        print(f"{name:<{width}}  {head[:100] + ('…' if len(head) > 100 else '')}")
    return 0
