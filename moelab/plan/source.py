"""Where a planned model comes from: a preset, a config TOML, or a Hugging Face config.json.

Hugging Face configs go through the same family readers ``moelab convert --from-hf`` uses
(``moelab.interop.families``), so the planner and the importer agree on what a config means. The
importer must refuse anything it cannot reproduce exactly (a RoPE variant, an fp8 checkpoint, a
norm epsilon); the planner only needs the shapes. So a refusal that cannot change a parameter
count or a tensor shape is recorded as a note and the reading goes on; a refusal that would
change the count (a bias moelab lacks, an unknown layer pattern) stays an error, since the
numbers would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.config import Config, ConfigError, from_dict
from moelab.fileio import JSONFileError, read_json_object
from moelab.interop.errors import InteropError

# config.json keys whose refusal by the importer cannot change parameter counts or shapes
SHAPE_NEUTRAL = {
    "rope_scaling", "rope_parameters", "rope_theta", "quantization_config", "sliding_window",
    "use_sliding_window", "rms_norm_eps", "hidden_act", "num_experts_per_tok", "norm_topk_prob",
    "clip_qkv", "topk_method", "scoring_func", "partial_rotary_factor",
}


@dataclass(frozen=True)
class ModelSource:
    """A config to plan for, its display name, and what was ignored or assumed reading it."""

    name: str
    config: Config
    notes: tuple[str, ...] = ()
    family: str | None = None            # Hugging Face model_type, when read from config.json
    mtp_layers: int = 0                  # DeepSeek-V3 multi-token-prediction modules, not counted
    hf: dict = field(default_factory=dict, compare=False, repr=False)


def load_source(spec: str, overrides: list[str] | None = None) -> ModelSource:
    """A preset name, a ``.toml`` path, or a Hugging Face ``config.json`` (or its folder)."""
    from moelab import resolve_config
    path = Path(spec)
    if spec.endswith(".json") or (path / "config.json").is_file():
        return load_hf(path, overrides)
    cfg = resolve_config(spec, overrides)
    name = path.stem if spec.endswith(".toml") else spec
    return ModelSource(name, cfg)


def load_hf(path: str | Path, overrides: list[str] | None = None) -> ModelSource:
    """A Hugging Face config.json (or the folder holding it); ``overrides`` apply to the result."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--hf-config {str(path)!r}: no config.json there")
    try:
        data = read_json_object(file)
    except JSONFileError as e:
        raise ConfigError(f"--hf-config: {e}") from None
    name = path.name if path.is_dir() else (file.parent.name or file.stem)
    source = source_from_hf(data, name)
    if overrides:
        cfg = source.config.with_overrides(overrides).validate()
        source = ModelSource(source.name, cfg, source.notes, source.family, source.mtp_layers, source.hf)
    return source


def source_from_hf(data: dict, name: str = "hf-model") -> ModelSource:
    """Our Config from an HF config dict: strictly first; then, if the importer refuses a
    shape-neutral setting, leniently with that setting noted."""
    from moelab.interop.hf import config_from_hf
    mtp = int(data.get("num_nextn_predict_layers") or 0) if data.get("model_type") == "deepseek_v3" else 0
    notes = []
    if mtp:
        notes.append(f"num_nextn_predict_layers = {mtp}: the multi-token-prediction module is not part of "
                     "the model transformers runs and is not counted (DeepSeek-V3 quotes 671B without it)")
    try:
        imported = config_from_hf(data)
        return ModelSource(name, imported.config, tuple(notes + imported.notes),
                           data.get("model_type"), mtp, data)
    except InteropError as strict_error:
        cfg, lenient_notes = _lenient(data, strict_error)
        return ModelSource(name, cfg, tuple(notes + lenient_notes), data.get("model_type"), mtp, data)


def _lenient(data: dict, strict_error: InteropError) -> tuple[Config, list[str]]:
    from moelab.interop.families import FAMILIES
    from moelab.interop.families.common import HFConfig

    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise strict_error
    ignored: list[str] = []

    class Lenient(HFConfig):
        def fail(self, key: str, value: Any, why: str) -> None:
            base = key.split(".")[0]
            if base not in SHAPE_NEUTRAL:
                raise InteropError(f"config.json ({self.family}): {key} = {value!r} is not supported: {why}; "
                                   "it changes the parameter count, so the planner cannot ignore it")
            ignored.append(f"{key} = {value!r} ignored ({why}); it does not change parameter counts")

    cleaned = dict(data)
    for key in ("rope_scaling", "rope_parameters"):
        value = cleaned.get(key)
        if isinstance(value, dict) and _rope_refused(value):
            kept = {k: v for k, v in value.items() if k == "rope_theta"}
            cleaned[key] = kept or None
            kind = value.get("rope_type", value.get("type"))
            ignored.append(f"{key} ({kind}) ignored: RoPE variants have no parameters and do not change "
                           "FLOPs; plain RoPE is planned")
    reader = Lenient(cleaned, model_type)
    model = FAMILIES[model_type].model_from_hf(reader)
    try:
        cfg = from_dict(Config, {"model": model}).validate()
    except ConfigError as e:
        raise InteropError(f"config.json ({model_type}) maps to an invalid moelab config: {e}") from None
    unread = reader.unread()
    if unread:
        ignored.append(f"config.json fields not used (not known to change the computation): {', '.join(unread)}")
    return cfg, ignored


def _rope_refused(d: dict) -> bool:
    """Would the importer refuse this RoPE dict? (kinds it implements, keys it knows)."""
    from moelab.interop.families.common import ROPE_KEYS
    kind = d.get("rope_type", d.get("type", "default"))
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        return True
    if kind in ("default", None):
        return False
    return kind not in ("linear", "llama3", "yarn") or bool(set(d) - ROPE_KEYS)
