"""One module per CLI command; each exposes ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared by every command that builds a config."""
    p.add_argument("--preset", help="preset name (see `moelab presets`)")
    p.add_argument("--config", metavar="FILE",
                   help="a config file instead of --preset: TOML, YAML (with PyYAML) or JSON, e.g. "
                        "from `moelab config`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.moe.top_k=1 (repeatable; keys "
                        "in docs/config.md)")


def config_from_args(args: argparse.Namespace):
    from moelab import resolve_config
    from moelab.config import Config
    from moelab.config_files import load_config_file, looks_like_file
    if args.config and args.preset:
        raise_user("give --preset or --config, not both")
    if args.preset and looks_like_file(args.preset):
        raise_user(f"--preset {args.preset!r} looks like a file name: give a file with --config")
    if args.config:
        spec = load_config_file(args.config)        # always a file, never a preset name
    else:
        spec = args.preset or Config()
    return resolve_config(spec, args.overrides)


def check_device(text: str, option: str = "--device") -> str:
    """``text`` when it names a device this machine has (cpu, cuda, cuda:N, mps), else a one-line
    UserError naming the option (torch itself would raise an AssertionError deep in a load)."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise_user(f"{option} {text!r} is not a device: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise_user(f"{option} {text}: no CUDA device is available{build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise_user(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise_user(f"{option} {text}: no Apple GPU (MPS) is available; use --device cpu")
    elif device.type != "cpu":
        raise_user(f"{option} {text}: moelab runs on cpu, cuda or mps")
    return text


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--quiet / --log-file, for the commands that talk while they work."""
    p.add_argument("--quiet", action="store_true",
                   help="print only warnings, errors and results (no progress)")
    p.add_argument("--log-file", metavar="FILE",
                   help="also append every message, with a timestamp, to FILE")


# what --quiet still prints
LOUD = ("warning", "error", "done:", "resumed", "stopped", "SIG")


def message_sink(args: argparse.Namespace, hide: tuple[str, ...] = ()):
    """The ``log`` callable for --quiet / --log-file (and messages to ``hide`` from the screen),
    or None when neither applies (the command's own printing stands)."""
    import sys
    import time
    if not (args.quiet or args.log_file or hide):
        return None
    log_file = open(args.log_file, "a", encoding="utf-8", buffering=1) if args.log_file else None

    def log(message: str) -> None:
        if log_file is not None:
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if message.startswith(hide) or (args.quiet and not message.startswith(LOUD)):
            return
        print(message, file=sys.stderr, flush=True)
    return log


def raise_user(message: str):
    from moelab.cli import UserError
    raise UserError(message)
