"""Run folders and checkpoints: safetensors for tensors, JSON for everything else.

A run folder is the unit every command passes around::

    RUN/config.json          the full Config (model, train, data)
    RUN/model.safetensors    the latest weights (what `moelab.load` reads)
    RUN/tokenizer.json       the tokenizer, when the run has one
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/ckpt-XXXXXXXX/       training checkpoints (weights, optimiser, trainer state)

Every file is written atomically (temp file in the same folder, fsync, rename), so a crash during
a save leaves the previous file intact. Nothing here unpickles: tensors load through safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelab.config import Config, ConfigError, from_dict
from moelab.fileio import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"


class CheckpointError(RuntimeError):
    """A run folder or checkpoint is missing, damaged or does not match the model."""


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    except SafetensorError as e:        # safetensors reports a failed write (full disk) as its own error
        raise OSError(None, str(e), str(path)) from None


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {e}") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers; tied weights appear once (the LM head is absent)."""
    return {k: v for k, v in model.state_dict().items()}


def save_run(run_dir: str | Path, model: torch.nn.Module, config: Config,
             tokenizer_json: str | None = None) -> Path:
    """Write config.json, model.safetensors and (optionally) tokenizer.json into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, config.to_dict())
    save_tensors(run_dir / WEIGHTS_FILE, model_state(model), {"format": "pt", "moelab": "1"})
    if tokenizer_json is not None:
        atomic_write(run_dir / TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(tokenizer_json, encoding="utf-8"))
    return run_dir


def read_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a moelab run folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    try:
        return from_dict(Config, data).validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shape {wrong[:5]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(run_dir: str | Path, device: str = "cpu", weights: str | Path | None = None):
    """The model of a run folder, in eval mode."""
    from moelab.model.transformer import Transformer
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = Transformer(cfg.model)
    path = Path(weights) if weights is not None else run_dir / WEIGHTS_FILE
    load_state_into(model, load_tensors(path), str(path))
    return model.to(device).eval()
