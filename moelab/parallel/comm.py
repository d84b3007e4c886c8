"""Collectives that count what they send: the expert-parallel all-to-all and FSDP2's all-gather and
reduce-scatter, each recording bytes and time into a :class:`CommMeter` that the trainer reads and
resets once per optimiser step.

Bytes are what this rank sends, counted from the tensors handed to the collective:
- all-to-all: the rows addressed to other ranks (``bytes``), and all rows including the slice a rank
  keeps for itself (``bytes_with_local``, which for dropless routing depends only on the batch);
- FSDP all-gather and reduce-scatter: (group size - 1) x this rank's shard, the volume one rank
  sends in a ring collective.
Time is wall-clock around the collective with its completion awaited (gloo on CPU runs it on the
calling thread anyway). On CUDA, waiting would cost FSDP its overlap of communication with
compute, so there the time is measured with CUDA events on the collective's stream and read when
the step is logged.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter


@dataclass
class CommMeter:
    """Per-step totals of one process's communication, by kind ("alltoall", "fsdp")."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    bytes_with_local: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    _events: list = field(default_factory=list)      # (kind, start, end) CUDA events, read lazily

    def record(self, kind: str, sent: int, sent_with_local: Optional[int] = None,
               seconds: float = 0.0) -> None:
        self.bytes[kind] += sent
        self.bytes_with_local[kind] += sent if sent_with_local is None else sent_with_local
        self.seconds[kind] += seconds

    def timed(self, kind: str, device: torch.device):
        return _Timer(self, kind, device)

    def take(self) -> dict:
        """This step's totals as plain numbers (``{kind}_bytes``, ``{kind}_bytes_with_local`` for
        all-to-all, ``{kind}_s``), then start counting afresh."""
        for kind, start, end in self._events:
            end.synchronize()
            self.seconds[kind] += start.elapsed_time(end) / 1000.0
        out = {}
        for kind in ("alltoall", "fsdp"):
            out[f"{kind}_bytes"] = int(self.bytes.get(kind, 0))
            if kind == "alltoall":
                out[f"{kind}_bytes_with_local"] = int(self.bytes_with_local.get(kind, 0))
            out[f"{kind}_s"] = float(self.seconds.get(kind, 0.0))
        self.bytes.clear(), self.bytes_with_local.clear(), self.seconds.clear(), self._events.clear()
        return out


class _Timer:
    def __init__(self, meter: CommMeter, kind: str, device: torch.device):
        self.meter, self.kind, self.cuda = meter, kind, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.meter._events.append((self.kind, self.start, end))
        else:
            self.meter.seconds[self.kind] += time.perf_counter() - self.t0
        return False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# FSDP2: all-gather and reduce-scatter through FSDPModule.set_custom_all_gather / _reduce_scatter
# ---------------------------------------------------------------------------------------------

# torch 2.13 renamed the tensor collectives (the old names warn on every call); torch >= 2.9 has
# only the old ones. Same signatures.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class MeteredAllGather(AllGather):
    def __init__(self, meter: CommMeter):
        self.meter = meter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        sent = _nbytes(input_tensor) * (dist.get_world_size(group) - 1)
        self.meter.record("fsdp", sent)
        with self.meter.timed("fsdp", input_tensor.device):
            work = _all_gather_single(output_tensor, input_tensor, group=group,
                                      async_op=async_op and input_tensor.is_cuda)
        return work


class MeteredReduceScatter(ReduceScatter):
    def __init__(self, meter: CommMeter):
        self.meter = meter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        sent = _nbytes(output_tensor) * (dist.get_world_size(group) - 1)
        self.meter.record("fsdp", sent)
        with self.meter.timed("fsdp", input_tensor.device):
            work = _reduce_scatter_single(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op and input_tensor.is_cuda)
        return work


# ---------------------------------------------------------------------------------------------
# Expert parallelism: all-to-all with uneven splits, differentiable
# ---------------------------------------------------------------------------------------------

def all_to_all_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange equal-sized slices of a 1-D count vector: rank p's slice j goes to rank j."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks in ``send_splits`` chunks (rank order), rows from them in
    ``recv_splits``; the backward sends the gradients the opposite way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup, meter: Optional[CommMeter]) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.meter = (send_splits, recv_splits), group, meter
        return _exchange(x, send_splits, recv_splits, group, meter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad.contiguous(), recv_splits, send_splits, ctx.group, ctx.meter), None, None, None, None


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
              group: dist.ProcessGroup, meter: Optional[CommMeter]) -> torch.Tensor:
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    if meter is not None:
        row = math.prod(x.shape[1:]) * x.element_size()                  # bytes per row
        me = dist.get_rank(group)
        meter.record("alltoall", sum(s for p, s in enumerate(send_splits) if p != me) * row,
                     sum(send_splits) * row)
        with meter.timed("alltoall", x.device):
            dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    else:
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                    group: dist.ProcessGroup, meter: Optional[CommMeter] = None) -> torch.Tensor:
    """(sum(send_splits), ...) rows out, (sum(recv_splits), ...) rows in; differentiable."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, meter)
