"""moelab: build, train, compare, inspect and run Dense, MoE and Hybrid-MoE language models.

The model classes and loaders import torch (seconds on a loaded machine), so they load on first use
(PEP 562): ``moelab --help``, ``moelab presets`` and ``moelab config`` start at once. ``moelab.build``
and ``moelab.load`` also give models their ``generate`` / ``stream`` methods (``moelab.generate``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

try:
    from moelab.config import (
        Config, ConfigError, ModelConfig, MoEConfig, MLAConfig, ParallelConfig, TrainConfig,
    )
except KeyboardInterrupt:
    # A Ctrl-C while `python -m moelab` (argv[0] is "-m" until the module is found) or the
    # `moelab` script imports this package, before moelab.cli can catch it: end as the CLI does,
    # with "interrupted" and status 130 instead of a traceback. A library import re-raises.
    if sys.argv[:1] == ["-m"] or Path(sys.argv[0] if sys.argv else "").name == "moelab":
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first use
_LAZY = {
    "MoE": "moelab.model.moe", "MoEOutput": "moelab.model.moe", "RouterStats": "moelab.model.moe",
    "ModelOutput": "moelab.model.transformer", "Transformer": "moelab.model.transformer",
    "load": "moelab.runfolder", "load_tokenizer": "moelab.runfolder",
}

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.moe import MoE, MoEOutput, RouterStats  # noqa: F401
    from moelab.model.transformer import ModelOutput, Transformer  # noqa: F401
    from moelab.runfolder import load, load_tokenizer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moelab' has no attribute {name!r}")
    if name == "Transformer":
        importlib.import_module("moelab.generate")       # models get .generate / .stream
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def resolve_config(spec: Union[str, Path, Config, ModelConfig], overrides: list[str] | None = None) -> Config:
    """A validated Config from a preset name, a config file (.toml, .yaml, .json), a Config or a
    ModelConfig."""
    from moelab.config_files import load_config_file, looks_like_file
    from moelab.presets import load_preset, preset_names

    if isinstance(spec, Config):
        cfg = spec
    elif isinstance(spec, ModelConfig):
        cfg = Config(model=spec)
    elif isinstance(spec, (str, Path)) and looks_like_file(spec):
        cfg = load_config_file(spec)
    elif isinstance(spec, str):
        cfg = load_preset(spec)
    else:
        raise ConfigError(f"cannot build a model from {spec!r}: give a preset name "
                          f"({', '.join(preset_names())}), a .toml/.yaml/.json path or a config")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg.validate()


def build(spec: Union[str, Path, Config, ModelConfig], overrides: list[str] | None = None) -> "Transformer":
    """Build a model from a preset name (``"mixtral"``), a config file or a config object."""
    importlib.import_module("moelab.generate")           # models get .generate / .stream
    from moelab.model.transformer import Transformer
    return Transformer(resolve_config(spec, overrides).model)


__all__ = [
    "__version__", "Config", "ConfigError", "ModelConfig", "MoEConfig", "MLAConfig", "ParallelConfig",
    "TrainConfig", *_LAZY, "build", "resolve_config",
]
