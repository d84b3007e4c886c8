"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), stored as safetensors + JSON
(DCP's Hugging Face storage layer), so nothing in a run folder is ever unpickled.

    ckpt-00000100/model/sharded/shard-0000R-model-0000I-of-0000N.safetensors   one per rank and tensor
    ckpt-00000100/optim/shard-0000R-model-0000I-of-0000N.safetensors           one per rank and tensor
    ckpt-00000100/rng/rank-0000R.safetensors                                   per-rank RNG state
    ckpt-00000100/trainer_state.json        step, tokens, time, optimiser param groups, layout

Every rank writes its own shards into the checkpoint's temporary folder; rank 0 writes
trainer_state.json last and renames the folder into place, so a checkpoint folder exists only
once it is complete. Each tensor is stored under its fully qualified name with its global shape
(DCP records each shard's offsets), so a checkpoint loads at any world size and expert-parallel
degree, and also in one process without a process group. Rank 0 also consolidates the model
shards into one ``model.safetensors`` of full tensors (the run folder's weights).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_DIR, OPTIM_DIR, RNG_DIR, SHARDED = "model", "optim", "rng", "sharded"
CONSOLIDATED_FILE = "model-00001-of-00001.safetensors"


def _state_dict_api():
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )
    return get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict


def flatten_optimizer(osd: dict) -> tuple[dict[str, Any], list[dict]]:
    """DCP's FQN-keyed optimizer state {"state": {fqn: {k: v}}, "param_groups": [...]} as flat
    tensors ``{fqn}/{k}`` plus the JSON-able param groups."""
    flat = {f"{fqn}/{key}": value for fqn, slots in osd["state"].items() for key, value in slots.items()}
    return flat, osd["param_groups"]


def unflatten_optimizer(flat: dict[str, Any], param_groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for name, value in flat.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 consolidate: bool = True) -> list[dict]:
    """Every rank writes its shards of the model and optimizer into ``folder``; returns the
    optimizer's param groups (JSON-able) for the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from safetensors.torch import save_file

    get_msd, get_osd, _, _ = _state_dict_api()
    msd = get_msd(model)
    # One file per tensor and rank: DCP serialises each file whole in memory before writing it,
    # so one file per rank would hold a second copy of the rank's whole shard (the optimizer's
    # moments: twice the model's shard) while saving.
    dcp.save(msd, storage_writer=HuggingFaceStorageWriter(
        str(folder / MODEL_DIR / SHARDED), save_distributed=True, fqn_to_index_mapping=_one_file_each(msd)))
    flat, groups = flatten_optimizer(get_osd(model, optimizer))
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(
        str(folder / OPTIM_DIR), save_distributed=True, fqn_to_index_mapping=_one_file_each(flat)))
    if consolidate and rank == 0:
        # full tensors, assembled one at a time from the ranks' bytes (DCP's consolidation)
        from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
        consolidate_safetensors_files(str(folder / MODEL_DIR / SHARDED), str(folder / MODEL_DIR),
                                      dict.fromkeys(msd, 1))
    (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
    save_file(rng_tensors(), str(folder / RNG_DIR / f"rank-{rank:05d}.safetensors"))
    return groups


def _one_file_each(state: dict) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(state), start=1)}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict], rank: int) -> None:
    """Fill ``model`` and ``optimizer`` (sharded or not, any layout) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from safetensors.torch import load_file

    import torch.distributed as dist
    get_msd, get_osd, set_msd, set_osd = _state_dict_api()
    no_dist = not (dist.is_available() and dist.is_initialized())     # one process: no group
    msd = get_msd(model)
    flat, _ = flatten_optimizer(get_osd(model, optimizer))
    with warnings.catch_warnings():      # DCP warns that one process means no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(msd, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR / SHARDED)),
                 no_dist=no_dist)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / OPTIM_DIR)), no_dist=no_dist)
    set_msd(model, msd)
    set_osd(model, optimizer, unflatten_optimizer(flat, param_groups))
    rng_file = folder / RNG_DIR / f"rank-{rank:05d}.safetensors"
    if not rng_file.is_file():                      # a different world size: rank 0's stream
        rng_file = folder / RNG_DIR / "rank-00000.safetensors"
    set_rng(load_file(str(rng_file)))


def load_full_into(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                   optim_state: dict) -> None:
    """Fill a (sharded) model and optimizer from full, unsharded tensors, as a one-process
    checkpoint holds them: every rank keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    _, _, set_msd, set_osd = _state_dict_api()
    options = StateDictOptions(full_state_dict=True)
    set_msd(model, weights, options=options)
    set_osd(model, optimizer, optim_state, options=options)


def sharded_files(folder: Path) -> list[Path]:
    return sorted((folder / MODEL_DIR / SHARDED).glob("*.safetensors")) + \
        sorted((folder / OPTIM_DIR).glob("*.safetensors"))


def _chunks(folder: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(offsets, shape) of every stored chunk of every tensor in a folder of DCP shards, read from
    the safetensors headers (DCP records each chunk's offsets in the file's metadata)."""
    import json
    from safetensors import safe_open
    from torch.distributed.checkpoint._hf_utils import CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY
    out: dict[str, list] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get(CUSTOM_METADATA_KEY, "{}"))
            for key in handle.keys():
                shape = list(handle.get_slice(key).get_shape())
                offsets = info.get(key, {}).get(SAVED_OFFSETS_KEY, [0] * len(shape))
                out.setdefault(key, []).append((offsets, shape))
    return out


class ShardedTensors:
    """The full tensors of a folder of DCP shards (a sharded checkpoint's ``model/sharded``), one
    at a time: ``get(name)`` assembles one tensor from the chunks every rank stored (offsets from
    the files' metadata), reading only that tensor's bytes, with plain reads (no memory map). What
    a streamed export reads, so its memory is one tensor, never the model."""

    def __init__(self, folder: Path):
        import json
        from torch.distributed.checkpoint._hf_utils import CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY
        from moelab.parallel.tensorfile import TensorFile
        self.folder = Path(folder)
        self._files = [TensorFile(f) for f in sorted(self.folder.glob("*.safetensors"))]
        if not self._files:
            raise FileNotFoundError(f"{self.folder} holds no shards")
        self._chunks: dict[str, list[tuple[int, list[int]]]] = {}
        for i, f in enumerate(self._files):
            info = json.loads(f.metadata.get(CUSTOM_METADATA_KEY, "{}"))
            for key in f.keys():
                offsets = info.get(key, {}).get(SAVED_OFFSETS_KEY, [0] * len(f.shape(key)))
                self._chunks.setdefault(key, []).append((i, offsets))
        self._shapes = {}
        for key, chunks in self._chunks.items():
            ends = [[o + s for o, s in zip(offsets, self._files[i].shape(key))] for i, offsets in chunks]
            self._shapes[key] = torch.Size([max(col) for col in zip(*ends)] if ends[0] else [])

    def keys(self) -> list[str]:
        return list(self._chunks)

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def dtype(self, key: str) -> torch.dtype:
        i, _ = self._chunks[key][0]
        return self._files[i].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        full = torch.empty(self._shapes[key], dtype=self.dtype(key))
        for i, offsets in self._chunks[key]:
            chunk = self._files[i].get(key)
            full[tuple(slice(o, o + s) for o, s in zip(offsets, chunk.shape))] = chunk
            del chunk
        return full


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def missing_pieces(folder: Path, world_size: int, param_groups: list[dict]) -> list[str]:
    """What a sharded checkpoint written by ``world_size`` ranks lacks, though the files that are
    there may read fine: model tensors, or optimizer states of the parameters ``param_groups``
    names, whose stored chunks do not cover their full shape (the consolidated weights' shapes;
    DCP stores non-overlapping chunks), and any rank's RNG file. Empty when it is complete."""
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        full = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = []
    model = _chunks(folder / MODEL_DIR / SHARDED)
    for key, shape in full.items():
        if sum(_volume(s) for _, s in model.get(key, [])) < _volume(shape):
            missing.append(f"{MODEL_DIR}/{SHARDED}: part of {key}")
    optim = _chunks(folder / OPTIM_DIR)
    slots = {k.rsplit("/", 1)[1] for k in optim}
    for key in (name for group in param_groups for name in group["params"]):
        for slot in sorted(slots):
            chunks = optim.get(f"{key}/{slot}", [])
            scalar = bool(chunks) and not chunks[0][1]                       # e.g. AdamW's step
            if not chunks or (not scalar and sum(_volume(s) for _, s in chunks) < _volume(full.get(key, []))):
                missing.append(f"{OPTIM_DIR}: part of {key}/{slot}")
    for rank in range(world_size):
        rng = f"{RNG_DIR}/rank-{rank:05d}.safetensors"
        if not (folder / rng).is_file():
            missing.append(rng)
    return missing
