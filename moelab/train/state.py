"""Training checkpoints: weights, optimiser moments, RNG and loop position, all as safetensors +
JSON (never pickle), written into a temporary folder that is renamed into place only when
complete, so an interrupted save can never replace a good checkpoint.

    RUN/ckpt-00000100/model.safetensors
    RUN/ckpt-00000100/optimizer.safetensors   (AdamW moments, step counts, RNG states)
    RUN/ckpt-00000100/trainer_state.json      (step, tokens, elapsed time, param groups)
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.fileio import atomic_write, fsync_dir
from moelab.train.checkpoint import (
    WEIGHTS_FILE, CheckpointError, load_state_into, load_tensors,
    model_state, save_tensors, write_json,
)

CKPT_PATTERN = re.compile(r"^ckpt-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class LoopState:
    step: int = 0            # optimiser steps completed
    tokens: int = 0          # training tokens consumed
    elapsed_s: float = 0.0   # training wall-clock so far (excludes eval and saving)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            tensors[f"state.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loop: LoopState, keep: int) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{loop.step:08d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = model_state(model)
    save_tensors(tmp / WEIGHTS_FILE, weights)
    opt, meta = optimizer_tensors(optimizer)
    opt["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        opt["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(tmp / OPTIMIZER_FILE, opt)
    write_json(tmp / STATE_FILE, {"step": loop.step, "tokens": loop.tokens,
                                  "elapsed_s": loop.elapsed_s, "optimizer": meta})
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(run_dir)
    # the run's top-level weights follow the newest checkpoint
    atomic_write(run_dir / WEIGHTS_FILE, lambda t: shutil.copyfile(final / WEIGHTS_FILE, t))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    """(weights, optimizer tensors, trainer state); raises CheckpointError if anything is damaged."""
    import json
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        int(state["step"]), int(state["tokens"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({STATE_FILE}: {e})") from None
    return load_tensors(ckpt / WEIGHTS_FILE), load_tensors(ckpt / OPTIMIZER_FILE), state


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, opt: dict,
            state: dict, source: str) -> LoopState:
    load_state_into(model, weights, source)
    restore_optimizer(optimizer, opt, state["optimizer"])
    torch.set_rng_state(opt["rng.cpu"])
    if "rng.cuda" in opt and torch.cuda.is_available():
        torch.cuda.set_rng_state(opt["rng.cuda"])
    return LoopState(int(state["step"]), int(state["tokens"]), float(state["elapsed_s"]))
