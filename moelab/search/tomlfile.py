"""A config written back as TOML, so that `moelab compare` (which takes presets or TOML files) can
train the patterns a search found. TOML has no null: a field set to None is left out when None is
also its default, and otherwise returned as a ``key=none`` override to pass beside the file."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from moelab.config import Config


def toml_value(v: Any) -> str:
    """One value as a TOML literal (also what ``--set key=<literal>`` parses)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)          # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML literal for {v!r}")


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
