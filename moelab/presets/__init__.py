"""Named presets: one small TOML file per system, each saying which paper it follows and what was
scaled down. A preset is a partial config; every field it leaves out keeps its default."""

from __future__ import annotations

import sys
from importlib import resources

from moelab.config import Config, ConfigError, from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        import difflib
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (available: {', '.join(preset_names())})")
    return resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    lines = [ln[2:] for ln in preset_text(name).splitlines() if ln.startswith("# ")]
    return " ".join(lines)


def load_preset(name: str) -> Config:
    return from_dict(Config, tomllib.loads(preset_text(name)))
