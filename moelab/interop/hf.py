"""Hugging Face folders and live transformers models <-> moelab runs and models.

Folders: ``import_hf(hf_dir, out_run)`` and ``export_hf(run_dir, out_dir, family)``. Checkpoints are
read through safetensors, memory-mapped (``safe_open``), shard by shard when there is a
``model.safetensors.index.json``; pickle files are never opened. Outputs are written into a temp
folder beside the destination and renamed at the end, so a failure leaves nothing behind.

Live models (need ``transformers``): ``to_transformers(model, family)`` and
``from_transformers(hf_model)``, in memory, for side-by-side runs and benchmarks.

What the key maps and config mappings do per family lives in ``moelab.interop.families``; this
module only moves files and tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch

from moelab.config import Config, ConfigError, ModelConfig, from_dict
from moelab.fileio import temp_dir_beside, write_text_atomic
from moelab.interop.errors import InteropError
from moelab.interop.families import FAMILIES
from moelab.interop.families.common import HFConfig
from moelab.interop.folder import check_name, inside
from moelab.interop.tokenizer_files import (TOKENIZER, check_fits, config_token_ids, read_tokenizer,
                                            special_tokens, tokenizer_files)
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
    from moelab.model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{folder / HF_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InteropError(f"{folder / HF_CONFIG} does not hold a JSON object")
    return data


def _mtp_keys(keys: set[str], n_layers: int) -> set[str]:
    """Keys of layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction modules)."""
    out = set()
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n_layers:
            out.add(k)
    return out


# ---------------------------------------------------------------------------------------------
# writing folders atomically
# ---------------------------------------------------------------------------------------------

class _Staging:
    """A temp folder beside ``dest`` that becomes ``dest`` on success and vanishes on failure."""

    def __init__(self, dest: PathLike):
        self.dest = Path(dest)

    def __enter__(self) -> Path:
        if self.dest.exists() and (not self.dest.is_dir() or any(self.dest.iterdir())):
            raise InteropError(f"{str(self.dest)!r} already exists and is not empty; choose a new --out")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_dir_beside(self.dest)
        except OSError as e:
            raise InteropError(f"cannot write {str(self.dest)!r}: {e.strerror} ({e.filename})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dest.is_dir():          # an empty folder: replace it
            self.dest.rmdir()
        os.replace(self.tmp, self.dest)


def _write_tokenizer(src: Path, dst: Path, what: str):
    """Copy ``src``'s tokenizer.json to ``dst`` once it has loaded (a corrupt one is refused, not
    copied on); returns the loaded tokenizer and its text, or None when ``src`` has none."""
    loaded = read_tokenizer(src, what)
    if loaded is not None:
        write_text_atomic(dst / TOKENIZER, loaded[1])
    return loaded


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------

def import_hf(hf_dir: PathLike, out_run: PathLike) -> list[str]:
    """Convert an HF model folder into a moelab run folder. Returns notes for the user.

    Tensors keep their stored dtype (bf16 stays bf16 on disk; ``moelab.load`` casts to the model's
    dtype), so an import followed by an export reproduces every tensor bit for bit. Every file is
    read from inside ``hf_dir`` (see ``moelab.interop.folder``)."""
    from moelab.train.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_tensors, write_json
    hf_dir = Path(hf_dir)
    imported = config_from_hf(read_hf_config(hf_dir))
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
    with _Staging(out_run) as tmp:
        if _write_tokenizer(hf_dir, tmp, "HF_DIR") is None:
            notes.append(f"{hf_dir} has no {TOKENIZER}; the run has no tokenizer")
        write_json(tmp / CONFIG_FILE, cfg.to_dict())
        save_tensors(tmp / WEIGHTS_FILE, state, {"format": "pt", "moelab": "1", "source": f"hf:{fam.MODEL_TYPE}"})
    return notes


def default_family(run_dir: PathLike) -> str:
    """The family a run exports to when none is named: the one it was imported from, else the
    first family that can express its config (llama for a dense model). Refuses, naming each
    family's reason, when none can."""
    from moelab.interop.families import family_for
    from moelab.train.checkpoint import CheckpointError, WEIGHTS_FILE, read_config
    run_dir = Path(run_dir)
    try:
        inside(run_dir, "config.json", "RUN: config.json")
        cfg = read_config(run_dir)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    return family_for(cfg.model, prefer=_imported_from(inside(run_dir, WEIGHTS_FILE, "RUN: weights")))


def _imported_from(weights: Path) -> Optional[str]:
    """The HF family recorded in the weights' metadata by ``import_hf`` (``source = hf:<family>``)."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            source = (f.metadata() or {}).get("source", "")
    except Exception:  # noqa: BLE001 - missing or damaged weights are reported by the export itself
        return None
    return source[3:] if source.startswith("hf:") else None


def export_hf(run_dir: PathLike, out_dir: PathLike, family_name: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a moelab run as a complete HF folder of ``family_name`` (None: ``default_family``):
    config.json with the bos/eos/pad ids, the weights, and when the run has a tokenizer,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json,
    so that ``AutoTokenizer`` knows its special tokens and ``generate`` stops at end of text.
    Weights over ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` shards
    with a ``model.safetensors.index.json``, as transformers writes them. Refuses models the family
    cannot express; returns notes on what was dropped (training-only settings)."""
    from moelab.train.checkpoint import (CheckpointError, WEIGHTS_FILE, load_tensors, read_config,
                                         save_tensors, write_json)
    run_dir = Path(run_dir)
    notes: list[str] = []
    if family_name is None:
        family_name = default_family(run_dir)
        notes.append(f"family {family_name}: the family this model's config maps to (choose another with --family)")
    fam = family(family_name)
    try:
        inside(run_dir, "config.json", "RUN: config.json")
        cfg = read_config(run_dir)
        state = load_tensors(inside(run_dir, WEIGHTS_FILE, "RUN: weights"))
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    _check_state(state, expected_state(cfg.model), str(run_dir / WEIGHTS_FILE))
    dtype = state["embed.weight"].dtype
    hf_cfg = config_to_hf(cfg.model, family_name, notes, dtype)
    tensors = ours_to_hf(fam.KEYMAP, cfg.model, state, rope_interleave=True)
    loaded = read_tokenizer(run_dir, "RUN")         # before writing anything: a bad one is refused
    extra_files: dict[str, dict] = {}
    if loaded is None:
        notes.append(f"{run_dir} has no {TOKENIZER}; the folder has no tokenizer and no token ids")
    else:
        tok, text = loaded
        check_fits(tok, cfg.model.vocab_size, str(run_dir / TOKENIZER))
        specials = special_tokens(tok)
        hf_cfg.update(config_token_ids(specials))
        extra_files = tokenizer_files(text, specials, cfg.model.max_seq_len)
    with _Staging(out_dir) as tmp:
        write_json(tmp / HF_CONFIG, hf_cfg)
        shards = plan_shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_tensors(tmp / HF_WEIGHTS, tensors, {"format": "pt"})
        else:
            weight_map = {}
            for i, keys in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_tensors(tmp / name, {k: tensors[k] for k in keys}, {"format": "pt"})
                weight_map.update(dict.fromkeys(keys, name))
            total = sum(_nbytes(t) for t in tensors.values())
            write_json(tmp / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if loaded is not None:
            write_text_atomic(tmp / TOKENIZER, loaded[1])
            for name, obj in extra_files.items():
                write_json(tmp / name, obj)
    return notes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``max_bytes`` unless one tensor alone
    is larger (it then gets a shard of its own, as transformers does)."""
    if max_bytes < 1:
        raise InteropError(f"max shard size = {max_bytes} bytes is invalid: must be > 0")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def parse_size(text: str) -> int:
    """'5GB', '500MB', '40KB' (powers of 1000, as transformers reads them), 'GiB'/'MiB'/'KiB'
    (powers of 1024) or plain bytes -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            break
    else:
        number, scale = t, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise InteropError(f"max shard size = {text!r} is invalid: use bytes or a size like 5GB, 500MB") from None
    if value < 1:
        raise InteropError(f"max shard size = {text!r} is invalid: must be > 0")
    return int(value)


def _check_state(state: dict, expected: dict, source: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k])}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise InteropError(f"{source} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")


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
    from moelab.quantize import cast_parameters_, from_state
    imported = config_from_hf(hf_model.config.to_dict())
    if notes is not None:
        notes.extend(imported.notes)
    cfg = imported.config.model
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    state = hf_to_ours(imported.family.KEYMAP, cfg, expected_state(cfg), set(hf_state), hf_state.__getitem__,
                       layout="module", rope_interleave=imported.rope_interleave)
    # copies, so the two models do not share storage (stacking experts copies; renames would not)
    state = {k: v.clone() for k, v in state.items()}
    try:
        model = from_state(cfg, state)
    except ValueError as e:
        raise InteropError(f"transformers {type(hf_model).__name__} {e}") from None
    param = next(hf_model.parameters())
    return cast_parameters_(model, param.dtype).to(param.device)
