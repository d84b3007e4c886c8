"""`moelab <command>`: one argparse front end; each command lives in ``moelab/commands/``.

Every command that takes a config accepts ``--set dotted.key=value`` overrides, and every command
that prints numbers accepts ``--json``. Config and input errors exit with status 2 and a message
that names the field or option, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moelab.config import ConfigError

# command name -> module in moelab.commands exposing add_parser(subparsers)
COMMANDS = ["presets", "info", "train", "eval", "convert", "compare", "generate", "bench", "plan",
            "inspect", "upcycle", "finetune"]


class UserError(Exception):
    """Bad input from the user: printed as 'error: ...' with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Build, train, compare, inspect and run Dense, MoE and Hybrid-MoE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"moelab.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # for commands that relaunch
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        # under torchrun every rank meets the same error: one of them says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
