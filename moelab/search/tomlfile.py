"""A config written back as TOML, so that `moelab compare` (which takes presets or TOML files) can
train the patterns a search found. TOML has no null: a field set to None is left out when None is
also its default, and otherwise returned as a ``key=none`` override to pass beside the file."""

from __future__ import annotations

import dataclasses

from moelab.config import Config
from moelab.config_files import toml_value


def _defaults(cls: type) -> dict:
    return dataclasses.asdict(cls())


def config_toml(cfg: Config) -> tuple[str, list[str]]:
    """(TOML text, ``key=none`` overrides) that together rebuild ``cfg`` exactly."""
    data, defaults = cfg.to_dict(), _defaults(Config)
    lines: list[str] = []
    nones: list[str] = []

    def table(name: str, node: dict, default: dict) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        for key, value in scalars.items():
            if value is None:
                if default.get(key) is not None:
                    nones.append(f"{name}.{key}=none")
                continue
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, value in node.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value, default.get(key) or {})

    for section, node in data.items():
        table(section, node, defaults[section])
    return "\n".join(lines), nones
