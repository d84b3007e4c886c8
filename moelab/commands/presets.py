"""`moelab presets`: list the named configs and what each follows, in full (the citations
included): wrapped to the terminal's width on a terminal, one line per preset in a pipe."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list presets and the paper or model each follows")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, description} objects")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.presets import preset_description, preset_names
    names = preset_names()
    if args.json:
        print(json.dumps([{"name": n, "description": _text(preset_description(n), n)} for n in names], indent=2))
        return 0
    width = max(map(len, names))
    columns = shutil.get_terminal_size((0, 0)).columns if sys.stdout.isatty() else 0
    for name in names:
        text = _text(preset_description(name), name)
        if columns > width + 30:
            lines = textwrap.wrap(text, columns - width - 2) or [""]
            print(f"{name:<{width}}  {lines[0]}")
            for line in lines[1:]:
                print(" " * (width + 2) + line)
        else:
            print(f"{name:<{width}}  {text}")
    return 0


def _text(description: str, name: str) -> str:
    """The description without its leading "name: " (the preset files start that way)."""
    return description[len(name) + 2:] if description.startswith(f"{name}: ") else description
