"""Training checkpoints: weights, optimiser moments, RNG and loop position, as safetensors + JSON
(never pickle), written into a temporary folder that is renamed into place only when complete,
so an interrupted save can never replace a good checkpoint. Two formats, one interface
(:class:`Checkpointer`), each readable by a run of either kind:

one process ("local")::

    RUN/ckpt-00000100/model.safetensors
    RUN/ckpt-00000100/optimizer.safetensors   (AdamW moments by parameter index, RNG state)
    RUN/ckpt-00000100/trainer_state.json      (step, tokens, elapsed time, param groups)

several processes ("sharded", ``torch.distributed.checkpoint``; see ``moelab.parallel.checkpoint``)::

    RUN/ckpt-00000100/model.safetensors       (consolidated full weights)
    RUN/ckpt-00000100/model/sharded/, optim/, rng/, trainer_state.json

A run resumes from its newest intact checkpoint: a damaged or incomplete newer one is named,
moved aside (never deleted) and skipped, unless ``strict`` asks to stop instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moelab.fileio import atomic_write, fsync_dir
from moelab.train.checkpoint import (
    WEIGHTS_FILE, CheckpointError, load_state_into, load_tensors,
    model_state, save_tensors, write_json,
)

CKPT_PATTERN = re.compile(r"^ckpt-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
DAMAGED_PREFIX = "damaged-"


@dataclass
class LoopState:
    step: int = 0            # optimiser steps completed
    tokens: int = 0          # training tokens consumed
    elapsed_s: float = 0.0   # training wall-clock so far (excludes eval and saving)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders (renamed into place, so complete when written), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------------------------------
# the one-process format
# ---------------------------------------------------------------------------------------------

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


def _write_local(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState) -> None:
    save_tensors(tmp / WEIGHTS_FILE, model_state(model))
    opt, meta = optimizer_tensors(optimizer)
    opt["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        opt["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(tmp / OPTIMIZER_FILE, opt)
    write_json(tmp / STATE_FILE, {"step": loop.step, "tokens": loop.tokens, "elapsed_s": loop.elapsed_s,
                                  "format": "local", "optimizer": meta})


def _read_state(ckpt: Path) -> dict:
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({STATE_FILE}: {e})") from None
    return state


def read_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    """(weights, optimizer tensors, trainer state) of a one-process checkpoint; raises
    CheckpointError if anything is damaged."""
    state = _read_state(ckpt)
    return load_tensors(ckpt / WEIGHTS_FILE), load_tensors(ckpt / OPTIMIZER_FILE), state


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, opt: dict,
            state: dict, source: str) -> LoopState:
    load_state_into(model, weights, source)
    restore_optimizer(optimizer, opt, state["optimizer"])
    torch.set_rng_state(opt["rng.cpu"])
    if "rng.cuda" in opt and torch.cuda.is_available():
        torch.cuda.set_rng_state(opt["rng.cuda"])
    return loop_state(state)


def loop_state(state: dict) -> LoopState:
    return LoopState(int(state["step"]), int(state["tokens"]), float(state["elapsed_s"]))


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """A one-process optimizer checkpoint (state by parameter index) keyed by parameter name, as
    ``torch.distributed.checkpoint.state_dict`` takes full state dicts. Indices follow the order
    of the optimizer's parameters, which ``build_optimizer`` derives from the model alone."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state: dict[str, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(order[int(idx)], {})[key] = value
    groups, start = [], 0
    for saved, live in zip(meta["param_groups"], optimizer.param_groups):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": order[start:start + len(live["params"])]})
        start += len(live["params"])
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# verification and choice of the checkpoint to resume
# ---------------------------------------------------------------------------------------------

def verify_checkpoint(ckpt: Path) -> dict:
    """Read enough of ``ckpt`` to know it is whole; returns its trainer state. One-process
    checkpoints are read in full; sharded ones have every shard's header checked, which safetensors
    refuses for a truncated file."""
    state = _read_state(ckpt)
    if state.get("format", "local") == "local":
        load_tensors(ckpt / WEIGHTS_FILE), load_tensors(ckpt / OPTIMIZER_FILE)
        return state
    from safetensors import SafetensorError, safe_open
    from moelab.parallel.checkpoint import sharded_files
    files = sharded_files(ckpt)
    if not files:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no model/optimizer shards)")
    for f in files + [ckpt / WEIGHTS_FILE]:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is damaged ({f.relative_to(ckpt)}: {e})") from None
    return state


@dataclass
class ResumePoint:
    path: Path
    state: dict
    moved_aside: list[Path]


def choose_resume_checkpoint(run_dir: Path, strict: bool = False,
                             warn: Callable[[str], None] = print) -> ResumePoint:
    """The newest intact checkpoint of ``run_dir``. Newer damaged ones are moved aside to
    ``damaged-ckpt-...`` (kept for inspection) once an intact one is found; with ``strict``, or
    when none is intact, nothing is moved and CheckpointError names what is wrong."""
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise CheckpointError(f"{str(run_dir)!r} has no checkpoint to resume from")
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(ckpts):
        try:
            state = verify_checkpoint(ckpt)
        except CheckpointError as e:
            damaged.append((ckpt, str(e)))
            if strict:
                raise CheckpointError(f"{e}; --strict-resume stops here (without it the run would "
                                      "resume from the newest intact checkpoint)") from None
            continue
        moved = []
        for bad, why in damaged:
            target = _aside_name(bad)
            os.rename(bad, target)
            moved.append(target)
            warn(f"{why}: moved aside to {target.name}; resuming from {ckpt.name}")
        if moved:
            fsync_dir(run_dir)
        return ResumePoint(ckpt, state, moved)
    raise CheckpointError("; ".join(why for _, why in damaged) + " (no intact checkpoint to resume from)")


def _aside_name(ckpt: Path) -> Path:
    target = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}.{n}")
    return target


# ---------------------------------------------------------------------------------------------
# the checkpointer the training loop uses
# ---------------------------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores training checkpoints for ``runtime``'s processes (one-process format
    alone, the sharded format under torch.distributed) and keeps the run's top-level weights on
    the newest one. Only the main process renames, copies and prunes."""

    def __init__(self, run_dir: Path, runtime, keep: int):
        self.run_dir, self.runtime, self.keep = Path(run_dir), runtime, keep
        self.sharded = runtime.layout.distributed

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState) -> Path:
        final = self.run_dir / f"ckpt-{loop.step:08d}"
        tmp = self.run_dir / f".{final.name}.tmp"
        main = self.runtime.layout.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.runtime.barrier()
        failure: Optional[BaseException] = None
        try:
            if self.sharded:
                from moelab.parallel.checkpoint import CONSOLIDATED_FILE, MODEL_DIR, save_sharded
                groups = save_sharded(tmp, model, optimizer, self.runtime.layout.rank)
                self.runtime.barrier()
                if main:
                    os.replace(tmp / MODEL_DIR / CONSOLIDATED_FILE, tmp / WEIGHTS_FILE)
                    write_json(tmp / STATE_FILE, {
                        "step": loop.step, "tokens": loop.tokens, "elapsed_s": loop.elapsed_s,
                        "format": "sharded", "optimizer": {"param_groups": groups},
                        "layout": {"world_size": self.runtime.layout.world_size,
                                   "ep": self.runtime.layout.ep, "dp_shard": self.runtime.layout.dp_shard}})
            else:
                _write_local(tmp, model, optimizer, loop)
            if main:
                fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(self.run_dir)
                # the run's top-level weights follow the newest checkpoint
                atomic_write(self.run_dir / WEIGHTS_FILE, lambda t: shutil.copyfile(final / WEIGHTS_FILE, t))
                for old in checkpoint_dirs(self.run_dir)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:          # noqa: BLE001 - cleaned up and re-raised below
            failure = e
        if self.runtime.any_of([failure is not None])[0]:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(failure, OSError):
                raise CheckpointError(self._disk_message(final, failure, model, optimizer)) from None
            if failure is not None:
                raise failure
            raise CheckpointError(f"saving {final} failed on another rank (see its error)")
        self.runtime.barrier()
        return final

    def _disk_message(self, final: Path, e: OSError, model, optimizer) -> str:
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        needed += sum(v.numel() * v.element_size() for s in optimizer.state.values()
                      for v in s.values() if torch.is_tensor(v))
        try:
            free = shutil.disk_usage(self.run_dir).free
            space = f"{free:,} bytes free there"
        except OSError:
            space = "free space unknown"
        where = e.filename or final
        return (f"could not write checkpoint {final.name} ({where}: {e.strerror or e}); it needs about "
                f"{needed:,} bytes, {space}. The previous checkpoint and model.safetensors are intact; "
                f"free some space and resume with `moelab train --resume {self.run_dir}`")

    def restore(self, point: ResumePoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
        state, ckpt = point.state, point.path
        if state.get("format", "local") == "sharded":
            from moelab.parallel.checkpoint import load_sharded
            load_sharded(ckpt, model, optimizer, state["optimizer"]["param_groups"], self.runtime.layout.rank)
            return loop_state(state)
        weights, opt, state = read_checkpoint(ckpt)
        if not self.sharded:
            return restore(model, optimizer, weights, opt, state, source=str(ckpt))
        from moelab.parallel.checkpoint import load_full_into
        load_full_into(model, optimizer, weights,
                       _full_optimizer_state(model, optimizer, opt, state["optimizer"]))
        torch.set_rng_state(opt["rng.cpu"])
        return loop_state(state)


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loop: LoopState, keep: int) -> Path:
    """One-process save (kept for callers outside the trainer)."""
    from moelab.parallel.runtime import SingleProcess
    return Checkpointer(Path(run_dir), SingleProcess(torch.device("cpu")), keep).save(model, optimizer, loop)
