"""moelab: build, train, compare, inspect and run Dense, MoE and Hybrid-MoE language models."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from moelab.config import (
    Config, ConfigError, ModelConfig, MoEConfig, MLAConfig, ParallelConfig, TrainConfig,
)

__version__ = "0.1.0"

# The model classes import torch (seconds on a loaded machine): load them on first use, so that
# `moelab --help`, `moelab presets` and `moelab config` start at once (PEP 562).
_LAZY = {"MoE": "moelab.model.moe", "MoEOutput": "moelab.model.moe", "RouterStats": "moelab.model.moe",
         "ModelOutput": "moelab.model.transformer", "Transformer": "moelab.model.transformer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


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
    """Build a model from a preset name (``"mixtral"``), a TOML path or a config object."""
    from moelab.model.transformer import Transformer
    return Transformer(resolve_config(spec, overrides).model)


def load(run_dir: Union[str, Path], device: str = "cpu") -> "Transformer":
    """Load the model of a run folder (trained or imported) in eval mode."""
    from moelab.train.checkpoint import load_model
    return load_model(run_dir, device=device)


__all__ = [
    "Config", "ConfigError", "ModelConfig", "MoEConfig", "MLAConfig", "ParallelConfig", "TrainConfig",
    "MoE", "MoEOutput", "RouterStats", "ModelOutput", "Transformer",
    "build", "load", "resolve_config",
]
