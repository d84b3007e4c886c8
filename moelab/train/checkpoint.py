"""Training checkpoints: weights, optimiser moments, RNG and loop position, as safetensors + JSON
(never pickle), written into a temporary folder that is renamed into place only when complete,
so an interrupted save can never replace a good checkpoint.

Two formats behind one :class:`Checkpointer`; the format is chosen once, from the runtime when
saving and from the checkpoint's own ``trainer_state.json`` when reading, so either kind of run
resumes from either kind of checkpoint:

one process (``LocalFormat``)::

    RUN/ckpt-00000100/model.safetensors
    RUN/ckpt-00000100/optimizer.safetensors   (AdamW moments by parameter index, RNG state)
    RUN/ckpt-00000100/trainer_state.json      (step, tokens, elapsed time, param groups)

several processes (``ShardedFormat``, ``torch.distributed.checkpoint``; ``moelab.parallel.checkpoint``)::

    RUN/ckpt-00000100/model.safetensors       (consolidated full weights)
    RUN/ckpt-00000100/model/sharded/, optim/, rng/, trainer_state.json

A run resumes from its newest intact checkpoint: a damaged or incomplete newer one is named,
moved aside (never deleted) and skipped, unless ``strict`` asks to stop instead.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moelab.fileio import atomic_write, fsync_dir, save_tensors, write_json
from moelab.model.weights import StateMismatch, check_shapes
from moelab.runfolder import (
    WEIGHTS_FILE, CheckpointError, checkpoint_dirs, checkpoint_name, load_tensors, model_state,
)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
DAMAGED_PREFIX = "damaged-"


@dataclass
class LoopState:
    step: int = 0            # optimiser steps completed
    tokens: int = 0          # training tokens consumed
    elapsed_s: float = 0.0   # training wall-clock so far (excludes eval and saving)

    @classmethod
    def from_state(cls, state: dict) -> "LoopState":
        return cls(int(state["step"]), int(state["tokens"]), float(state["elapsed_s"]))

    def as_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s}


@dataclass
class ResumePoint:
    path: Path
    state: dict              # the checkpoint's trainer_state.json
    moved_aside: list[Path]


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names missing, unexpected and mis-shaped tensors."""
    try:
        check_shapes({k: v.shape for k, v in model.state_dict().items()},
                     {k: v.shape for k, v in state.items()}, source)
    except StateMismatch as e:
        raise CheckpointError(str(e)) from None
    model.load_state_dict(state, strict=True)


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


def _optimizer_state_by_index(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return state


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """A one-process optimizer checkpoint (state by parameter index) keyed by parameter name, as
    ``torch.distributed.checkpoint.state_dict`` takes full state dicts. Indices follow the order
    of the optimizer's parameters, which ``build_optimizer`` derives from the model alone."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[idx]: slots for idx, slots in _optimizer_state_by_index(tensors).items()}
    groups, start = [], 0
    for saved, live in zip(meta["param_groups"], optimizer.param_groups):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": order[start:start + len(live["params"])]})
        start += len(live["params"])
    return {"state": state, "param_groups": groups}


class FullWeights:
    """What a checkpoint keeps of the model: by default every weight (model.safetensors). A LoRA
    run passes its adapter instead (``moelab.adapt.lora``: the trainable tensors in peft's
    format, the frozen base never copied); ``files`` are copied to the run folder after a save."""

    files = (WEIGHTS_FILE,)

    def write(self, folder: Path, model) -> None:
        save_tensors(folder / WEIGHTS_FILE, model_state(model))

    def verify(self, folder: Path) -> None:
        load_tensors(folder / WEIGHTS_FILE)

    def restore(self, folder: Path, model) -> None:
        load_weights_into(model, load_tensors(folder / WEIGHTS_FILE), str(folder))


FULL_WEIGHTS = FullWeights()


class LocalFormat:
    """One process: the weights, the optimizer state by parameter index and the RNG."""

    name = "local"

    def write(self, tmp: Path, model, optimizer, loop: LoopState, runtime, weights=FULL_WEIGHTS) -> None:
        weights.write(tmp, model)
        opt, meta = optimizer_tensors(optimizer)
        opt["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            opt["rng.cuda"] = torch.cuda.get_rng_state()
        save_tensors(tmp / OPTIMIZER_FILE, opt)
        write_json(tmp / STATE_FILE, {**loop.as_state(), "format": self.name, "optimizer": meta,
                                      "weight_files": list(weights.files)})

    def verify(self, ckpt: Path, state: dict) -> None:
        for name in state.get("weight_files", [WEIGHTS_FILE]):
            if name.endswith(".safetensors"):
                load_tensors(ckpt / name)
            elif not (ckpt / name).is_file():
                raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {name})")
        load_tensors(ckpt / OPTIMIZER_FILE)

    def restore(self, ckpt: Path, state: dict, model, optimizer, runtime, weights=FULL_WEIGHTS) -> None:
        opt = load_tensors(ckpt / OPTIMIZER_FILE)
        meta = state["optimizer"]
        if runtime.layout.distributed:            # full tensors into this rank's shards
            from moelab.parallel.checkpoint import load_full_into
            weights_ = load_tensors(ckpt / WEIGHTS_FILE)
            load_full_into(model, optimizer, weights_, _full_optimizer_state(model, optimizer, opt, meta))
        else:
            weights.restore(ckpt, model)
            optimizer.load_state_dict({"state": _optimizer_state_by_index(opt),
                                       "param_groups": meta["param_groups"]})
            if "rng.cuda" in opt and torch.cuda.is_available():
                torch.cuda.set_rng_state(opt["rng.cuda"])
        torch.set_rng_state(opt["rng.cpu"])


class ShardedFormat:
    """Several processes: every rank writes its shards (DCP); rank 0 the consolidated weights."""

    name = "sharded"

    def write(self, tmp: Path, model, optimizer, loop: LoopState, runtime, weights=FULL_WEIGHTS) -> None:
        from moelab.parallel.checkpoint import CONSOLIDATED_FILE, MODEL_DIR, save_sharded
        layout = runtime.layout
        groups = save_sharded(tmp, model, optimizer, layout.rank)
        runtime.barrier()
        if layout.is_main:
            os.replace(tmp / MODEL_DIR / CONSOLIDATED_FILE, tmp / WEIGHTS_FILE)
            write_json(tmp / STATE_FILE, {
                **loop.as_state(), "format": self.name, "optimizer": {"param_groups": groups},
                "layout": {"world_size": layout.world_size, "ep": layout.ep, "dp_shard": layout.dp_shard}})

    def verify(self, ckpt: Path, state: dict) -> None:
        """Every shard's header is read (safetensors refuses a truncated file), and every piece the
        checkpoint's layout implies is present (``moelab.parallel.checkpoint.missing_pieces``)."""
        from safetensors import SafetensorError, safe_open
        from moelab.parallel.checkpoint import missing_pieces, sharded_files
        try:
            missing = missing_pieces(ckpt, int(state["layout"]["world_size"]),
                                     state["optimizer"]["param_groups"])
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is damaged ({e})") from None
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} is incomplete (missing {', '.join(missing[:4])})")
        for f in sharded_files(ckpt) + [ckpt / WEIGHTS_FILE]:
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"checkpoint {ckpt} is damaged ({f.relative_to(ckpt)}: {e})") from None

    def restore(self, ckpt: Path, state: dict, model, optimizer, runtime, weights=FULL_WEIGHTS) -> None:
        from moelab.parallel.checkpoint import load_sharded
        load_sharded(ckpt, model, optimizer, state["optimizer"]["param_groups"], runtime.layout.rank)


FORMATS = {f.name: f for f in (LocalFormat(), ShardedFormat())}


# ---------------------------------------------------------------------------------------------
# verification and choice of the checkpoint to resume
# ---------------------------------------------------------------------------------------------

def read_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json, checked for the fields every format needs."""
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        LoopState.from_state(state)
        if state.get("format", "local") not in FORMATS:
            raise ValueError(f"unknown format {state.get('format')!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({STATE_FILE}: {e})") from None
    return state


def verify_checkpoint(ckpt: Path) -> dict:
    """Read enough of ``ckpt`` to know it is whole; returns its trainer state."""
    state = read_state(ckpt)
    FORMATS[state.get("format", "local")].verify(ckpt, state)
    return state


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
    """Saves and restores training checkpoints for ``runtime``'s processes and keeps the run's
    top-level weights on the newest one. Only the main process renames, copies and prunes."""

    def __init__(self, run_dir: Path, runtime, keep: int, weights=None):
        self.run_dir, self.runtime, self.keep = Path(run_dir), runtime, keep
        self.format = FORMATS["sharded" if runtime.layout.distributed else "local"]
        self.weights = weights or FULL_WEIGHTS     # what of the model a checkpoint holds

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState) -> Path:
        final = self.run_dir / checkpoint_name(loop.step)
        tmp = self.run_dir / f".{final.name}.tmp"
        main = self.runtime.layout.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.runtime.barrier()
        failure: Optional[BaseException] = None
        stage = "checkpoint"
        try:
            self.format.write(tmp, model, optimizer, loop, self.runtime, self.weights)
            if main:
                fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(self.run_dir)
                stage = "weights"           # the checkpoint is complete from here
                # the run's top-level weights follow the newest checkpoint
                for name in self.weights.files:
                    atomic_write(self.run_dir / name, lambda t, name=name: shutil.copyfile(final / name, t))
                for old in checkpoint_dirs(self.run_dir)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:          # noqa: BLE001 - cleaned up and re-raised below
            failure = e
        if self.runtime.any_of([failure is not None])[0]:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(failure, OSError):
                if stage == "weights":
                    raise CheckpointError(self._weights_copy_message(final, failure)) from None
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

    def _weights_copy_message(self, final: Path, e: OSError) -> str:
        """The checkpoint was written; only refreshing the run's top-level weights failed."""
        try:
            space = f"{shutil.disk_usage(self.run_dir).free:,} bytes free there"
        except OSError:
            space = "free space unknown"
        needed = (final / WEIGHTS_FILE).stat().st_size if (final / WEIGHTS_FILE).is_file() else 0
        return (f"checkpoint {final.name} is complete, but copying its weights to "
                f"{self.run_dir / WEIGHTS_FILE} failed ({e.filename or WEIGHTS_FILE}: {e.strerror or e}); "
                f"it needs {needed:,} bytes, {space}. The run's {WEIGHTS_FILE} still holds the previous "
                f"weights; free some space and resume with `moelab train --resume {self.run_dir}` "
                f"(it continues from {final.name})")

    def restore(self, point: ResumePoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
        FORMATS[point.state.get("format", "local")].restore(point.path, point.state, model, optimizer,
                                                             self.runtime, self.weights)
        return LoopState.from_state(point.state)
