"""Giving a model that was built and sharded on the meta device its real tensors, shard by shard:
each rank allocates only its own shards and writes into them from full tensors handed over one at
a time (the replayed initial weights, ``moelab.model.init_replay``) or from rows read straight out
of a safetensors file (a run folder, or a Hugging Face folder through its key map,
``moelab.interop.sharded``). No rank ever holds the whole model.

    model = build_on_meta(cfg)                   # or init_replay.build_recorded(cfg)
    model = runtime.wrap(model)                  # EP + FSDP2 while on meta: DTensor parameters
    allocate(model, device)                      # this rank's shards, uninitialised; buffers computed
    recipe.replay(lambda name, full: put(model, name, full))   # or load_rows(model, source)

A sharded parameter is a DTensor; the slice of a full tensor it keeps is what
``distribute_tensor(full, mesh, placements, src_data_rank=None)`` gives (no communication), so
it is by construction what FSDP2 and expert parallelism would have cut from an eager model. For
reading, the rows of dim 0 a rank keeps are found the same way (on an ``arange``), so a shard of an
(E, 2F, D) expert weight reads only that rank's experts from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = ()  # type: ignore[assignment]


class RowSource(Protocol):
    """Tensors by our state-dict names, readable by rows of dim 0 without reading the rest."""

    def shapes(self) -> dict[str, torch.Size]: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 of tensor ``name``, in its stored dtype."""
        ...

    def describe(self) -> str: ...


class SafetensorsRows:
    """A moelab safetensors file (a run folder's or checkpoint's ``model.safetensors``), read
    with plain reads (``moelab.parallel.tensorfile``)."""

    def __init__(self, path: str | Path):
        from moelab.parallel.tensorfile import TensorFile
        self.path = str(path)
        self._file = TensorFile(self.path)

    def shapes(self) -> dict[str, torch.Size]:
        return {k: self._file.shape(k) for k in self._file.keys()}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file.rows(name, start, stop)

    def describe(self) -> str:
        return self.path


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------

def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Give a meta model storage on ``device``: sharded parameters get this rank's shards
    (uninitialised, ``to_empty``, which FSDP2 expects); plain parameters stay on meta until
    ``put`` assigns them (no second copy); buffers are computed as a fresh model has them
    (``Transformer.init_buffers``: RoPE tables, zeros elsewhere)."""
    if any(is_sharded(p) for p in model.parameters()):
        model.to_empty(device=device)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and not buf.is_meta:         # to_empty left garbage: recompute
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="meta")
    model.init_buffers(device)


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        return module, leaf, True
    if leaf in module._buffers:
        return module, leaf, False
    raise KeyError(f"{name!r} is neither a parameter nor a buffer of the model")


@torch.no_grad()
def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a whole tensor, any device) this rank keeps of ``param``."""
    if not is_sharded(param):
        return full
    return distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


@torch.no_grad()
def put(model: nn.Module, name: str, full: torch.Tensor) -> None:
    """Write the full tensor ``full`` into parameter or buffer ``name``: this rank's shard of a
    sharded parameter, the whole of anything else (converted to the slot's dtype and device)."""
    module, leaf, is_param = _slot(model, name)
    slot = module._parameters[leaf] if is_param else module._buffers[leaf]
    if is_sharded(slot):
        span = local_rows(slot)        # rows of dim 0: slice on the host, move only the slice
        slot.to_local().copy_(full[span[0]:span[1]] if span is not None else local_part(slot, full))
    elif is_param and slot.is_meta:
        module._parameters[leaf] = nn.Parameter(full.to(device=_device_of(model), dtype=slot.dtype),
                                                requires_grad=slot.requires_grad)
    else:
        slot.copy_(full)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's real tensors live (its buffers are allocated before any parameter)."""
    for t in model.buffers():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def unfilled(model: nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


# ---------------------------------------------------------------------------------------------
# reading rows
# ---------------------------------------------------------------------------------------------

def local_rows(param: torch.Tensor) -> Optional[tuple[int, int]]:
    """The rows ``start:stop`` of dim 0 this rank keeps of ``param``, when its shard is exactly
    those rows (sharded on dim 0 only); None when it is cut another way (read it whole then)."""
    if not is_sharded(param):
        return (0, param.shape[0]) if param.dim() else None
    if any(not isinstance(p, Replicate) and getattr(p, "dim", None) != 0 for p in param.placements):
        return None
    index = distribute_tensor(torch.arange(param.shape[0]), param.device_mesh, param.placements,
                              src_data_rank=None).to_local()
    if index.numel() == 0:
        return (0, 0)
    start, stop = int(index[0]), int(index[-1]) + 1
    return (start, stop) if stop - start == index.numel() and bool((index.diff() == 1).all()) else None


@torch.no_grad()
def load_rows(model: nn.Module, source: RowSource) -> None:
    """Fill an ``allocate``d model from ``source``: every parameter reads only this rank's rows
    (its whole tensor when it is not sharded by rows), persistent buffers are read whole.
    Shapes are checked first, all at once (``moelab.model.weights.check_shapes``)."""
    from moelab.model.weights import check_shapes, expected_shapes
    check_shapes(expected_shapes(model), source.shapes(), source.describe())
    for name, slot in model.state_dict(keep_vars=True).items():
        module, leaf, is_param = _slot(model, name)
        target = slot.to_local() if is_sharded(slot) else slot
        span = local_rows(slot) if is_param else None
        if span is None:
            full = source.rows(name, 0, slot.shape[0] if slot.dim() else 0)
            put(model, name, full.to(target.dtype))
            continue
        part = source.rows(name, *span).to(target.dtype)
        if is_sharded(slot):
            target.copy_(part)
        else:
            put(model, name, part)
