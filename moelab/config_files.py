"""Config files in and out: TOML (the native format), YAML (with PyYAML installed) and JSON.

``load_config_file`` reads any of them into a :class:`~moelab.config.Config` (unvalidated, like
``load_toml``); ``dump_config`` writes a Config as text that ``load_config_file`` reads back to an
equal Config, every section and key included, defaults too. TOML has no null, so a field that is
none is written ``"none"``, which the loader reads as none for the fields that may be none.

A spec given where a preset or a file is accepted is a file when it names one: it has a path
separator or a suffix (preset names have neither), so ``--config x.yaml`` is never looked up as a
preset.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from moelab.config import Config, ConfigError, from_dict, to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

TOML_SUFFIXES = (".toml",)
YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)
FORMATS = ("toml", "yaml", "json")
YAML_HINT = "install PyYAML (pip install pyyaml, or moelab's extra: pip install 'moelab[yaml]')"


def looks_like_file(spec: str | Path) -> bool:
    """Whether ``spec`` names a file rather than a preset (presets have no '/', '\\' or '.')."""
    text = str(spec)
    return isinstance(spec, Path) or any(c in text for c in "/\\.") or Path(text).is_file()


def load_config_file(path: str | Path) -> Config:
    """A Config from a .toml, .yaml/.yml or .json file; errors name the file and what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not suffix and not path.exists() and _is_preset(path.name):
        raise ConfigError(f"config file {str(path)!r} does not exist (for the preset, use --preset {path.name})")
    if suffix not in TOML_SUFFIXES + YAML_SUFFIXES + JSON_SUFFIXES:
        raise ConfigError(f"config file {str(path)!r} must be TOML or YAML (or JSON), not "
                          f"{suffix or 'a file without a suffix'}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    data = _parse(text, suffix, path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of sections (model, train, "
                          f"data, parallel), not {type(data).__name__}")
    return from_dict(Config, data)


def _parse(text: str, suffix: str, path: Path) -> Any:
    if suffix in TOML_SUFFIXES:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    if suffix in JSON_SUFFIXES:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"config file {str(path)!r} is YAML, which needs PyYAML: {YAML_HINT}; "
                          "or write it as TOML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: "
                          f"{' '.join(str(e).split())}") from None
    return {} if data is None else data


def _is_preset(name: str) -> bool:
    from moelab.presets import preset_names
    return name in preset_names()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def dump_config(cfg: Config, fmt: str = "toml", header: str = "") -> str:
    """``cfg`` as a complete ``fmt`` file (toml, yaml or json). ``header`` becomes a leading
    comment in TOML and YAML."""
    data = to_dict(cfg)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--format yaml needs PyYAML: {YAML_HINT}") from None
        return comment + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if fmt == "toml":
        return comment + _toml(data)
    raise ConfigError(f"--format {fmt!r} is invalid: must be one of {', '.join(FORMATS)}")


def _toml(data: dict) -> str:
    """Nested dicts as TOML tables ([model], [model.moe], ...), scalars first in each table."""
    out: list[str] = []

    def table(d: dict, name: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if name:
            out.append(f"\n[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, f"{name}.{k}" if name else k)

    table(data, "")
    return "\n".join(out).lstrip("\n") + "\n"


def toml_value(v: Any) -> str:
    """One value as a TOML literal (also what ``--set key=<literal>`` parses); None as "none"."""
    if v is None:
        return '"none"'
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
        return json.dumps(v)           # TOML basic strings share JSON's escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")
