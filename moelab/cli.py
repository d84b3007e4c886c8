"""`moelab <command>`: one argparse front end; each command lives in ``moelab/commands/``.

Every command that takes a config accepts ``--set dotted.key=value`` overrides, and every command
that prints numbers accepts ``--json``. Config and input errors exit with status 2 and a message
that names the field or option, never a traceback.

As a process (``moelab ...`` or ``python -m moelab ...``, where ``main`` gets no argument list),
a Ctrl-C at any moment, start-up included, ends with "interrupted" and status 130, and once the
command has finished a further Ctrl-C ends the process at once, without Python reporting an
exception inside an exit handler (torch, TensorBoard and others run some at exit).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from typing import Optional

# command name -> module in moelab.commands exposing add_parser(subparsers)
COMMANDS = ["presets", "config", "info", "train", "eval", "convert", "compare", "generate", "bench",
            "plan", "inspect", "search", "studies", "upcycle", "finetune"]
EXIT_INTERRUPTED = 130          # 128 + SIGINT, what a shell reports for a Ctrl-C


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


def empty_value(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The first option (or positional) given as an empty string, which would otherwise mean its
    default (``--out ''``: a timestamped folder) or the current directory (a run folder '')."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = subparsers[0].choices[args.command] if subparsers else parser
    for action in command._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            return action.option_strings[-1] if action.option_strings else action.metavar or action.dest
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        return _run_interruptible(argv)
    # as a process: a finished command ends the process through moelab.proc.exit_process
    from moelab.proc import exit_process
    code = 1
    try:
        code = _run_interruptible(None)
    except SystemExit as e:           # argparse's own exits (--help, a bad option)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:             # a bug: its traceback, then the same orderly exit
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        # the command is over: a Ctrl-C now ends the process at once (the default action),
        # not as an exception inside whatever exit handler happens to be running
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return exit_process(code)


def _run_interruptible(argv: list[str] | None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str] | None) -> int:
    # imported here, not at the top: the console script imports this module before main()
    # can catch a Ctrl-C, so the module itself stays quick to import
    from moelab.config import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # for commands that relaunch
    try:
        empty = empty_value(parser, args)
        if empty:
            raise UserError(f"{empty} '' is invalid: it must not be empty")
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        # under torchrun every rank meets the same error: one of them says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`moelab presets | head`): stop quietly, as Unix tools do
        # (before OSError, of which it is one)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as e:
        # a folder that cannot be written (read-only, missing parent, full disk, no permission) or
        # a file that cannot be read: the user's to fix, so one line, not a traceback
        if e.errno not in _USER_ERRNOS or e.strerror is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {where}{e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
