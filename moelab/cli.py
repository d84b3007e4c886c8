"""`moelab <command>`: one argparse front end; each command lives in ``moelab/commands/``.

Every command that takes a config accepts ``--set dotted.key=value`` overrides, and every command
that prints numbers accepts ``--json``. Config and input errors exit with status 2 and a message
that names the field or option, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from moelab.config import ConfigError

# command name -> module in moelab.commands exposing add_parser(subparsers)
COMMANDS = ["presets", "config", "info", "train", "eval", "convert", "compare", "generate", "bench",
            "plan", "inspect", "search", "upcycle", "finetune"]


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


class UserError(Exception):
    """Bad input from the user: printed as 'error: ...' with exit status 2."""


def has_default(action: argparse.Action) -> bool:
    """Whether --help should show the action's default (not for flags, lists or unset values)."""
    d = action.default
    return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default (skipping the ones that have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not has_default(action) or "%(default)" in text or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every command's parser (and its sub-commands') shows defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and has_default(action):
            action.help = "(default: %(default)s)"      # argparse prints nothing for an option without help
        return action


def build_parser() -> argparse.ArgumentParser:
    from moelab import __version__
    parser = _Parser(
        prog="moelab",
        description="Build, train, compare, inspect and run Dense, MoE and Hybrid-MoE language models.")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
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
    except OSError as e:
        # a folder that cannot be written (read-only, missing parent, full disk, no permission) or
        # a file that cannot be read: the user's to fix, so one line, not a traceback
        if e.errno not in _USER_ERRNOS or e.strerror is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {where}{e.strerror}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`moelab presets | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
