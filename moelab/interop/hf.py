"""Hugging Face configs, checkpoints and live transformers models <-> moelab configs and models.

HF folders are read through safetensors, memory-mapped (``safe_open``), shard by shard when there
is a ``model.safetensors.index.json``; pickle files are never opened, and every file read resolves
inside the folder (``moelab.interop.containment``). ``hf_folder_state`` converts a folder in memory
(``moelab.load`` uses it); ``moelab.interop.folders`` writes run folders and HF folders.

Live models (need ``transformers``): ``to_transformers(model, family)`` and
``from_transformers(hf_model)``, in memory, for side-by-side runs and benchmarks.

What the key maps and config mappings do per family lives in ``moelab.interop.families``; this
module only moves tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch

from moelab.config import Config, ConfigError, ModelConfig, from_dict
from moelab.fileio import JSONFileError, read_json_object
from moelab.interop.errors import InteropError
from moelab.interop.families import FAMILIES
from moelab.interop.families.common import HFConfig
from moelab.interop.containment import check_name, inside
from moelab.interop.keymap import hf_to_ours, ours_to_hf

PathLike = Union[str, Path]
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9          # transformers' long-standing default, "5GB"


# ---------------------------------------------------------------------------------------------
# config: HF dict <-> our Config
# ---------------------------------------------------------------------------------------------

@dataclass
class Imported:
    """A translated HF config: our Config, the family, RoPE layout and notes for the user."""

    config: Config
    family: ModuleType
    rope_interleave: bool = False
    notes: list[str] = field(default_factory=list)


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise InteropError(f"unsupported family {name!r}: supported are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def config_from_hf(hf: dict) -> Imported:
    """Our Config from an HF config.json dict; errors name the HF field we cannot honour."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise InteropError(f"config.json: model_type = {model_type!r} is not supported "
                           f"(supported: {', '.join(FAMILIES)})")
    fam = FAMILIES[model_type]
    reader = HFConfig(hf, model_type)
    model = fam.model_from_hf(reader)
    interleave = fam.rope_interleave(reader) if hasattr(fam, "rope_interleave") else False
    notes = []
    unread = reader.unread()
    if unread:
        notes.append(f"config.json fields not used (not known to change the computation): {', '.join(unread)}")
    seq = min(128, model["max_seq_len"])
    try:
        cfg = from_dict(Config, {"model": model, "train": {"seq_len": seq}}).validate()
    except ConfigError as e:
        raise InteropError(f"config.json ({model_type}) maps to an invalid moelab config: {e}") from None
    return Imported(cfg, fam, interleave, notes)


def config_to_hf(m: ModelConfig, family_name: str, notes: Optional[list[str]] = None,
                 dtype: torch.dtype = torch.float32) -> dict:
    """The HF config.json dict of ``family_name`` for our model; refuses what it cannot express."""
    fam = family(family_name)
    notes = [] if notes is None else notes
    body = fam.model_to_hf(m, notes)
    return {"architectures": [fam.ARCHITECTURE], "model_type": fam.MODEL_TYPE,
            "dtype": str(dtype).removeprefix("torch."), **body}


def expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for ``cfg``, from a model built on the meta device (no memory)."""
    from moelab.model.weights import build_on_meta, expected_shapes
    return expected_shapes(build_on_meta(cfg))


# ---------------------------------------------------------------------------------------------
# reading an HF folder
# ---------------------------------------------------------------------------------------------

class Checkpoint:
    """The tensors of an HF folder, memory-mapped: one ``model.safetensors`` or the shards named
    by ``model.safetensors.index.json``. Tensors load one at a time on ``get``."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        index = folder / HF_INDEX
        if inside(folder, HF_INDEX).is_file():
            weight_map = read_index(folder)
            files = sorted(set(weight_map.values()))
        elif inside(folder, HF_WEIGHTS).is_file():
            files, weight_map = [HF_WEIGHTS], None
        else:
            pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
            extra = f" (found {', '.join(sorted(pickles))}: pickle files are never loaded; convert them to " \
                    "safetensors first)" if pickles else ""
            raise InteropError(f"{folder} has no {HF_WEIGHTS} or {HF_INDEX}{extra}")
        self.handles, self.where = {}, {}
        for name in files:
            path = inside(folder, name, f"{index}: shard")
            if not path.is_file():
                raise InteropError(f"{index} names shard {name!r}, which is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError, OSError: truncated, empty or not safetensors
                raise InteropError(f"{folder / name} is damaged, truncated or not a safetensors file: {e}") from None
            self.handles[name] = handle
            for k in keys:
                self.where[k] = name
        if weight_map is not None:
            lost = sorted(k for k, f in weight_map.items() if self.where.get(k) != f)
            if lost:
                raise InteropError(f"{index} lists tensors its shards do not hold: {lost[:5]}")

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:
            raise InteropError(f"{self.where[key]}: tensor {key!r} cannot be read (truncated file?): {e}") from None


def read_index(folder: Path) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json``: tensor name -> shard file name, every
    shard name a relative path inside ``folder``."""
    index = folder / HF_INDEX
    try:
        data = json.loads(inside(folder, HF_INDEX).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{index} is damaged: {e}") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise InteropError(f"{index} is damaged: expected a JSON object with a 'weight_map'")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise InteropError(f"{index}: weight_map = {_short(weight_map)} is invalid: must be an object "
                           "mapping tensor names to shard file names")
    for key, name in weight_map.items():
        check_name(name, f"{index}: weight_map[{key!r}]")
    return weight_map


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_hf_config(folder: PathLike) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise InteropError(f"{str(folder)!r} is not a folder")
    path = inside(folder, HF_CONFIG)
    if not path.is_file():
        raise InteropError(f"{str(folder)!r} is not a Hugging Face model folder (no {HF_CONFIG})")
    try:
        return read_json_object(path)
    except JSONFileError as e:
        raise InteropError(str(e)) from None


def _mtp_keys(keys: set[str], n_layers: int) -> set[str]:
    """Keys of layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction modules)."""
    out = set()
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n_layers:
            out.add(k)
    return out


# ---------------------------------------------------------------------------------------------
# an HF folder, in memory
# ---------------------------------------------------------------------------------------------

def hf_folder_config(hf_dir: PathLike) -> Imported:
    """The translated config of an HF model folder (nothing else read)."""
    return config_from_hf(read_hf_config(Path(hf_dir)))


def hf_folder_state(hf_dir: PathLike) -> tuple[Config, dict[str, torch.Tensor], list[str]]:
    """(our Config, our state dict, notes for the user) of an HF model folder, in memory. Tensors
    keep their stored dtype and stay memory-mapped where no transform copies them; every file is
    read from inside ``hf_dir``."""
    hf_dir = Path(hf_dir)
    imported = hf_folder_config(hf_dir)
    cfg, fam = imported.config, imported.family
    ckpt = Checkpoint(hf_dir)
    available = ckpt.keys()
    notes = list(imported.notes)
    mtp = _mtp_keys(available, cfg.model.n_layers)
    if mtp and getattr(fam, "EXTRA_LAYERS_ARE_MTP", False):
        notes.append(f"skipped {len(mtp)} tensors of multi-token-prediction layers (not run by transformers either)")
        available -= mtp
    state = hf_to_ours(fam.KEYMAP, cfg.model, expected_state(cfg.model), available, ckpt.get,
                       rope_interleave=imported.rope_interleave)
    return cfg, state, notes


# ---------------------------------------------------------------------------------------------
# live models
# ---------------------------------------------------------------------------------------------

def to_transformers(model, family_name: str, *, attn_implementation: str = "sdpa",
                    notes: Optional[list[str]] = None):
    """A ``transformers`` model of ``family_name`` computing what ``model`` (a moelab Transformer)
    computes: its config translated, weights copied (not shared) in the model's dtype, eval mode."""
    import transformers
    fam = family(family_name)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = state["embed.weight"].dtype
    hf_dict = config_to_hf(model.config, family_name, notes, dtype)
    hf_dict.pop("architectures")
    hf_dict.pop("dtype")
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=attn_implementation, dtype=dtype)
    tensors = ours_to_hf(fam.KEYMAP, model.config, state, layout="module", rope_interleave=True)
    if model.config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    result = hf_model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"transformers' {fam.ARCHITECTURE} does not match the converted weights: "
                           f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return hf_model.to(next(model.parameters()).device).eval()


def from_transformers(hf_model, notes: Optional[list[str]] = None):
    """A moelab Transformer (eval mode) computing what the ``transformers`` model computes, in
    its dtype: the parameters are built straight from the converted tensors (a bf16 model is
    never upcast to float32 on the way)."""
    from moelab.model.weights import StateMismatch, build_on_meta, fill
    imported = config_from_hf(hf_model.config.to_dict())
    if notes is not None:
        notes.extend(imported.notes)
    cfg = imported.config.model
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    state = hf_to_ours(imported.family.KEYMAP, cfg, expected_state(cfg), set(hf_state), hf_state.__getitem__,
                       layout="module", rope_interleave=imported.rope_interleave)
    param = next(hf_model.parameters())
    try:
        # copies, so the two models do not share storage (stacking experts copies; renames would not)
        return fill(build_on_meta(cfg), {k: v.shape for k, v in state.items()}, lambda k: state[k].clone(),
                    f"transformers {type(hf_model).__name__}", dtype=param.dtype, device=param.device)
    except StateMismatch as e:
        raise InteropError(str(e)) from None
