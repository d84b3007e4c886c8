"""The handle the training loop holds on its processes: one class for a single process, one for
torch.distributed, with the same methods, so the loop itself never asks how many processes run.

    runtime = start(layout, device)
    model = runtime.wrap(model)                  # expert parallelism + FSDP2 (identity alone)
    x = runtime.local_rows(x)                    # this rank's rows of the global batch
    loss, aux = runtime.mean([loss, aux])        # averages over ranks
    stop, save = runtime.any_of([stop, save])    # every rank takes the same decision

Gradient averaging: FSDP2 is told to sum gradients (``set_gradient_divide_factor(1.0)``; gloo's
AVG is wrong under FSDP2, pytorch#162338) and each rank scales its loss by 1 / world size
(``loss_scale``). Every rank holds the same number of tokens, so the sum of the scaled per-rank
mean losses is the global mean, and its gradient is the one-process gradient.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moelab.config import ConfigError
from moelab.parallel.layout import Layout
from moelab.parallel.clip import clip_grad_norm_


class SingleProcess:
    """One process: every collective is the identity."""

    def __init__(self, device: torch.device):
        self.layout = Layout()
        self.device = device
        self.meter = None
        self.loss_scale = 1.0

    def wrap(self, model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
        return model

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def any_of(self, flags: list[bool]) -> list[bool]:
        return list(flags)

    def max_of(self, values: list[float]) -> list[float]:
        return list(values)

    def per_rank(self, value: float) -> list[float]:
        return [value]

    def broadcast_int(self, value: int) -> int:
        return value

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return clip_grad_norm_(model.parameters(), max_norm)

    def comm_start_step(self) -> None:
        pass

    def comm_record(self) -> Optional[dict]:
        return None

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Meshes:
    dp: "object"                  # dense parameters: (dp_replicate,) x dp_shard
    experts: Optional["object"]   # expert weights' FSDP mesh: what EP leaves of dp_shard
    ep: Optional["object"]        # expert-parallel mesh


class Distributed:
    """torch.distributed: one process per device (or per CPU slot with gloo)."""

    def __init__(self, layout: Layout, device: torch.device, timeout_s: float = 1800.0):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from moelab.parallel.comm import CommMeter

        self.layout, self.device = layout, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ConfigError(f"WORLD_SIZE = {layout.world_size} but {', '.join(missing)} is not set: "
                              "start distributed runs with torchrun (or `moelab train --nproc N`)")
        # A caller that already runs its own process group (a library user, the test worker that
        # trains several jobs in one launch) keeps it: re-initialising one in the same process can
        # read the previous group's rendezvous keys from the store and hang.
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                        device_id=device if device.type == "cuda" else None)
            except (RuntimeError, ValueError, TimeoutError) as e:
                raise ConfigError(f"could not join the torchrun rendezvous ({backend}): {e}") from None
        self._dist = dist
        # experts: (dp_replicate, dp_shard_mod_ep, ep), the ep dim splits them, the rest is FSDP;
        # dense parameters: FSDP over dp_shard = dp_shard_mod_ep x ep (HSDP with dp_replicate)
        world = init_device_mesh(device.type, (layout.dp_replicate, layout.dp_shard_mod_ep, layout.ep),
                                 mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"))
        hsdp = layout.dp_replicate > 1
        if hsdp:
            dp = init_device_mesh(device.type, (layout.dp_replicate, layout.dp_shard),
                                  mesh_dim_names=("dp_replicate", "dp_shard"))
            experts = world["dp_replicate", "dp_shard_mod_ep"]
        else:
            dp = world["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
            experts = world["dp_shard_mod_ep"]
        self.meshes = Meshes(dp=dp, experts=experts if layout.ep > 1 else None,
                             ep=world["ep"] if layout.ep > 1 else None)
        self.meter = CommMeter()
        self.loss_scale = 1.0 / layout.world_size
        self._model: Optional[nn.Module] = None

    # ---- model ------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
        from moelab.parallel.expert_parallel import shard_experts
        from moelab.parallel.fsdp import apply_fsdp
        if self.meshes.ep is not None:
            shard_experts(model, self.meshes.ep, self.meter)
        for moe in model.moe_layers():
            moe.count_reducer = self.sum_tensor
        apply_fsdp(model, self.meshes, self.device, self.meter)
        self._model = model
        return model

    # ---- data -------------------------------------------------------------------------------
    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rank r's contiguous slice of the global batch's rows."""
        per_rank = x.shape[0] // self.layout.world_size
        return x[self.layout.rank * per_rank:(self.layout.rank + 1) * per_rank]

    # ---- agreement --------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.layout.world_size for v in self._all_reduce(values, self._dist.ReduceOp.SUM)]

    def any_of(self, flags: list[bool]) -> list[bool]:
        return [v > 0 for v in self._all_reduce([float(f) for f in flags], self._dist.ReduceOp.MAX)]

    def max_of(self, values: list[float]) -> list[float]:
        return self._all_reduce(list(values), self._dist.ReduceOp.MAX)

    def per_rank(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        t = torch.zeros(self.layout.world_size, dtype=torch.float64, device=self.device)
        t[self.layout.rank] = value
        self._dist.all_reduce(t)
        return t.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._dist.broadcast(t, src=0)
        return int(t.item())

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (all of them are data-parallel here); a new tensor."""
        out = t.clone()
        self._dist.all_reduce(out)
        return out

    # ---- gradients ----------------------------------------------------------------------------
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        from moelab.parallel.fsdp import clip_grad_norm
        return clip_grad_norm(model, max_norm)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def comm_start_step(self) -> None:
        """Count from here: what evaluation sent is not training traffic."""
        self.meter.take()

    def comm_record(self) -> dict:
        """This step's communication of every rank: {key: [one value per rank]}."""
        mine = self.meter.take()
        keys = sorted(mine)
        t = torch.zeros(self.layout.world_size, len(keys), dtype=torch.float64, device=self.device)
        t[self.layout.rank] = torch.tensor([float(mine[k]) for k in keys], dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t)
        cols = t.cpu().tolist()
        return {k: [int(row[i]) if k.endswith("bytes") or k.endswith("local") else row[i] for row in cols]
                for i, k in enumerate(keys)}

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()


def start(layout: Layout, device: torch.device):
    """The runtime for ``layout``: a process group and meshes when it spans several processes."""
    return Distributed(layout, device) if layout.distributed else SingleProcess(device)
