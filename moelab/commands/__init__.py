"""One module per CLI command; each exposes ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared by every command that builds a config."""
    p.add_argument("--preset", help="preset name (see `moelab presets`)")
    p.add_argument("--config", help="a config TOML file (instead of --preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.moe.top_k=1 (repeatable)")


def config_from_args(args: argparse.Namespace):
    from moelab import resolve_config
    from moelab.config import Config
    if args.config and args.preset:
        raise_user("give --preset or --config, not both")
    spec = args.config or args.preset
    return resolve_config(spec if spec else Config(), args.overrides)


def raise_user(message: str):
    from moelab.cli import UserError
    raise UserError(message)
