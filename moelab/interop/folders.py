"""Hugging Face model folders <-> moelab run folders, as files: ``import_hf(hf_dir, out_run)`` and
``export_hf(run_dir, out_dir, family)``. Outputs are written into a temp folder beside the
destination and renamed at the end, so a failure leaves nothing behind; every file read resolves
inside the folder named (``moelab.interop.containment``). The tensor and config translation itself
lives in ``moelab.interop.hf``; this module moves files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from moelab.fileio import save_tensors, temp_dir_beside, write_json, write_text_atomic
from moelab.interop.errors import InteropError
from moelab.interop.containment import inside
from moelab.interop.hf import (DEFAULT_MAX_SHARD_BYTES, HF_CONFIG, HF_INDEX, HF_WEIGHTS, PathLike,
                               config_to_hf, expected_state, family, hf_folder_config, hf_folder_state)
from moelab.interop.tokenizer_files import (TOKENIZER, check_fits, config_token_ids, read_tokenizer,
                                            special_tokens, tokenizer_files)
from moelab.runfolder import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_config

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
    read from inside ``hf_dir`` (see ``moelab.interop.containment``)."""
    hf_dir = Path(hf_dir)
    cfg, state, notes = hf_folder_state(hf_dir)
    fam = hf_folder_config(hf_dir).family
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
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source: str = "auto") -> list[str]:
    """Write a moelab run as a complete HF folder of ``family_name`` (None: ``default_family``):
    config.json with the bos/eos/pad ids, the weights, and when the run has a tokenizer,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json,
    so that ``AutoTokenizer`` knows its special tokens and ``generate`` stops at end of text.
    Weights over ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` shards
    with a ``model.safetensors.index.json``, as transformers writes them. The weights are read and
    written a tensor at a time (``moelab.interop.sharded``): ``source`` "auto" reads the newest
    checkpoint's shards when several processes wrote it, else the run's model.safetensors
    ("sharded" / "weights" force one). Refuses models the family cannot express, before writing
    anything; returns notes on what was dropped (training-only settings)."""
    from moelab.interop.sharded import RunWeights, planned_hf_tensors, write_hf_shards
    if source not in ("auto", "sharded", "weights"):
        raise InteropError(f"source = {source!r} is invalid: one of auto, sharded, weights")
    run_dir = Path(run_dir)
    notes: list[str] = []
    if family_name is None:
        family_name = default_family(run_dir)
        notes.append(f"family {family_name}: the family this model's config maps to (choose another with --family)")
    fam = family(family_name)
    try:
        inside(run_dir, "config.json", "RUN: config.json")
        cfg = read_config(run_dir)
        inside(run_dir, WEIGHTS_FILE, "RUN: weights")
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    weights = RunWeights(run_dir, source)
    _check_shapes(weights.shapes(), expected_state(cfg.model), weights.where)
    hf_cfg = config_to_hf(cfg.model, family_name, notes, weights.dtype("embed.weight"))
    planned, made_from = planned_hf_tensors(fam, cfg.model, weights)
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
    shards = plan_shards(planned, max_shard_bytes)
    files = [HF_WEIGHTS] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with _Staging(out_dir) as tmp:
        write_json(tmp / HF_CONFIG, hf_cfg)
        write_hf_shards(tmp, files, shards, planned, made_from, fam, cfg.model, weights)
        if len(shards) > 1:
            weight_map = {n: f for f, names in zip(files, shards) for n in names}
            total = sum(_nbytes(t) for t in planned.values())
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


def _check_shapes(shapes: dict, expected: dict, source: str) -> None:
    from moelab.model.weights import StateMismatch, check_shapes
    try:
        check_shapes(expected, shapes, source, what="its config")
    except StateMismatch as e:
        raise InteropError(str(e)) from None


# ---------------------------------------------------------------------------------------------
