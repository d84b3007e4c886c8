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


def device_option(name: str, option: str = "--device"):
    """The torch.device an option names, refused by name when it is malformed or absent here
    (before any model is read, and instead of torch's own assertion)."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise_user(f"{option} {name!r} is invalid: expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        raise_user(f"{option} {name!r} is invalid: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise_user(f"{option} {name!r} is invalid: no CUDA device is available here "
                       "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise_user(f"{option} {name!r} is invalid: this machine has {torch.cuda.device_count()} "
                       "CUDA devices")
    return device


def refuse_unwritable(folder, option: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, before any work, creating
    nothing: the nearest existing ancestor must be a writable folder."""
    import os
    from pathlib import Path
    path = Path(folder)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise_user(f"{option} {str(folder)!r} is invalid: {str(probe)!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise_user(f"{option} {str(folder)!r} is invalid: {str(probe)!r} is not writable")
