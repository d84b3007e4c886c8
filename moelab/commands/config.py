"""`moelab config`: print the full resolved config (every section and key, defaults included) as
a file that `--config` reads back to the same config.

    moelab config --preset mixtral --set train.max_steps=500 > mixtral.toml
    moelab train --config mixtral.toml --out runs/mx
"""

from __future__ import annotations

import sys

from moelab.commands import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the full resolved config (TOML, JSON or YAML)",
                       description="Print the config that --preset/--config plus --set resolve to, "
                                   "every key included, as a file that --config accepts back. "
                                   "Every key is described in docs/config.md.")
    add_config_args(p)
    p.add_argument("--format", choices=("toml", "json", "yaml"), default="toml",
                   help="output format (yaml needs PyYAML)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moelab.config_files import dump_config
    cfg = config_from_args(args)
    # no record of the source here: printing a printed file again gives the same bytes
    header = "moelab config: the full resolved config; every key and its meaning: docs/config.md"
    if args.format == "toml":
        header += '\nTOML has no null: "none" stands for it'
    sys.stdout.write(dump_config(cfg, args.format, header))
    return 0
