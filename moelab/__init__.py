"""moelab: build, train, compare, inspect and run Dense, MoE and Hybrid-MoE language models.

The names below load on first use (PEP 562), so ``import moelab`` and the command line start
without importing torch; ``moelab.build`` and ``moelab.load`` also give models their
``generate`` / ``stream`` methods (``moelab.generate``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Config": "moelab.config", "ConfigError": "moelab.config", "ModelConfig": "moelab.config",
    "MoEConfig": "moelab.config", "MLAConfig": "moelab.config", "ParallelConfig": "moelab.config",
    "TrainConfig": "moelab.config",
    "MoE": "moelab.model.moe", "MoEOutput": "moelab.model.moe", "RouterStats": "moelab.model.moe",
    "ModelOutput": "moelab.model.transformer", "Transformer": "moelab.model.transformer",
    "load": "moelab.runfolder", "load_tokenizer": "moelab.runfolder",
}

if TYPE_CHECKING:  # pragma: no cover
    from moelab.config import (Config, ConfigError, MLAConfig, ModelConfig, MoEConfig,  # noqa: F401
                               ParallelConfig, TrainConfig)
    from moelab.model.moe import MoE, MoEOutput, RouterStats  # noqa: F401
    from moelab.model.transformer import ModelOutput, Transformer
    from moelab.runfolder import load, load_tokenizer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moelab' has no attribute {name!r}")
    if name == "Transformer":
        importlib.import_module("moelab.generate")       # models get .generate / .stream
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def resolve_config(spec: Union[str, Path, "Config", "ModelConfig"], overrides: list[str] | None = None) -> "Config":
    """A validated Config from a preset name, a TOML path, a Config or a ModelConfig."""
    from moelab.config import Config, ConfigError, ModelConfig, load_toml
    from moelab.presets import load_preset, preset_names

    if isinstance(spec, Config):
        cfg = spec
    elif isinstance(spec, ModelConfig):
        cfg = Config(model=spec)
    elif isinstance(spec, (str, Path)) and str(spec).endswith(".toml"):
        cfg = load_toml(spec)
    elif isinstance(spec, str):
        cfg = load_preset(spec)
    else:
        raise ConfigError(f"cannot build a model from {spec!r}: give a preset name "
                          f"({', '.join(preset_names())}), a .toml path or a config")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg.validate()


def build(spec: Union[str, Path, "Config", "ModelConfig"], overrides: list[str] | None = None) -> "Transformer":
    """Build a model from a preset name (``"mixtral"``), a TOML path or a config object."""
    importlib.import_module("moelab.generate")           # models get .generate / .stream
    from moelab.model.transformer import Transformer
    return Transformer(resolve_config(spec, overrides).model)


__all__ = ["__version__", *_LAZY, "build", "resolve_config"]
