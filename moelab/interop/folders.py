"""Hugging Face model folders <-> moelab run folders, as files: ``import_hf(hf_dir, out_run)`` and
``export_hf(run_dir, out_dir, family)``. Outputs are written into a temp folder beside the
destination and renamed at the end, so a failure leaves nothing behind. The tensor and config
translation itself lives in ``moelab.interop.hf``; this module only moves files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from moelab.fileio import save_tensors, write_json
from moelab.interop.errors import InteropError
from moelab.interop.hf import (DEFAULT_MAX_SHARD_BYTES, HF_CONFIG, HF_INDEX, HF_WEIGHTS, TOKENIZER,
                               TOKENIZER_EXTRAS, PathLike, config_to_hf, expected_state, family,
                               hf_folder_state, read_hf_config)
from moelab.interop.keymap import ours_to_hf
from moelab.runfolder import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_tensors, read_config

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
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dest.is_dir():          # an empty folder: replace it
            self.dest.rmdir()
        os.replace(self.tmp, self.dest)


def _copy_tokenizer(src: Path, dst: Path, extras: bool) -> bool:
    if not (src / TOKENIZER).is_file():
        return False
    shutil.copyfile(src / TOKENIZER, dst / TOKENIZER)
    if extras:
        for name in TOKENIZER_EXTRAS:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    return True


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------

def import_hf(hf_dir: PathLike, out_run: PathLike) -> list[str]:
    """Convert an HF model folder into a moelab run folder. Returns notes for the user.

    Tensors keep their stored dtype (bf16 stays bf16 on disk; ``moelab.load`` casts to the model's
    dtype), so an import followed by an export reproduces every tensor bit for bit."""
    hf_dir = Path(hf_dir)
    cfg, state, notes = hf_folder_state(hf_dir)
    model_type = read_hf_config(hf_dir)["model_type"]
    with _Staging(out_run) as tmp:
        write_json(tmp / CONFIG_FILE, cfg.to_dict())
        save_tensors(tmp / WEIGHTS_FILE, state, {"format": "pt", "moelab": "1", "source": f"hf:{model_type}"})
        if not _copy_tokenizer(hf_dir, tmp, extras=False):
            notes.append(f"{hf_dir} has no {TOKENIZER}; the run has no tokenizer")
    return notes


def export_hf(run_dir: PathLike, out_dir: PathLike, family_name: str,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a moelab run as an HF folder of ``family_name`` (config.json, the weights, and
    tokenizer.json when the run has one). Weights over ``max_shard_bytes`` are split into
    ``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json``, as
    transformers writes them. Refuses models the family cannot express; returns notes on what
    was dropped (training-only settings)."""
    run_dir = Path(run_dir)
    fam = family(family_name)
    try:
        cfg = read_config(run_dir)
        state = load_tensors(run_dir / WEIGHTS_FILE)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    _check_state(state, expected_state(cfg.model), str(run_dir / WEIGHTS_FILE))
    notes: list[str] = []
    dtype = state["embed.weight"].dtype
    hf_cfg = config_to_hf(cfg.model, family_name, notes, dtype)
    tensors = ours_to_hf(fam.KEYMAP, cfg.model, state, rope_interleave=True)
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
        if not _copy_tokenizer(run_dir, tmp, extras=True):
            notes.append(f"{run_dir} has no {TOKENIZER}; the folder has no tokenizer")
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
    from moelab.model.weights import StateMismatch, check_shapes
    try:
        check_shapes(expected, {k: v.shape for k, v in state.items()}, source, what="its config")
    except StateMismatch as e:
        raise InteropError(str(e)) from None


# ---------------------------------------------------------------------------------------------
