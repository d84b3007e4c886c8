"""Where a run's processes sit: world size, rank, and the degrees of data and expert parallelism.

A :class:`Layout` is built once, from the ``parallel.*`` config and the environment torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), and checked against the model before any process
group exists, so a bad layout is refused by name on every rank at once with the same message.

Mesh (torchtitan's layout for FSDP2 + expert parallelism, without tensor/context parallelism)::

    world = dp_replicate x dp_shard             dense parameters: HSDP over (dp_replicate, dp_shard)
    dp_shard = dp_shard_mod_ep x ep             expert weights: split over ep, FSDP over the rest

With one process every degree is 1 and nothing distributed is touched: ``parallel.*`` keys of a
run that trained on N processes are simply ignored when it resumes on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moelab.config import Config, ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes logs, progress, metrics and run files."""
        return self.rank == 0

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        parts = [f"{self.world_size} processes", f"FSDP2 over {self.dp_shard}"]
        if self.dp_replicate > 1:
            parts.append(f"{self.dp_replicate} replicas (HSDP)")
        if self.ep > 1:
            parts.append(f"experts over {self.ep} (ep), sharded over {self.dp_shard_mod_ep}")
        return ", ".join(parts)


def env_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name} = {value!r} is not an integer "
                              "(is this process started by torchrun?)") from None
    world = read("WORLD_SIZE", 1)
    return world, read("RANK", 0), read("LOCAL_RANK", 0)


def plan_layout(cfg: Config, world_size: int, rank: int = 0, local_rank: int = 0) -> Layout:
    """The layout ``cfg`` asks for on ``world_size`` processes; raises ConfigError naming the field
    when it cannot run. Pure: no process group, no device work."""
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE = {world_size} is invalid: must be >= 1")
    if world_size == 1:
        return Layout()
    par, model, train = cfg.parallel, cfg.model, cfg.train
    dp_shard = world_size if par.dp_shard == -1 else par.dp_shard
    if world_size % dp_shard:
        raise ConfigError(f"parallel.dp_shard = {par.dp_shard} is invalid: must divide the number of "
                          f"processes ({world_size}), or be -1 for all of them")
    if dp_shard % par.ep:
        raise ConfigError(f"parallel.ep = {par.ep} is invalid: must divide the FSDP sharding degree "
                          f"parallel.dp_shard ({dp_shard} on {world_size} processes); expert-parallel "
                          "ranks are taken from the sharding dimension")
    moe_layers = model.moe_layer_indices()
    if par.ep > 1:
        if not moe_layers:
            raise ConfigError(f"parallel.ep = {par.ep} is invalid: the model has no MoE layers "
                              "(use parallel.ep = 1 for a dense model)")
        for layer in moe_layers:
            experts = model.experts_in_layer(layer)
            if experts % par.ep:
                raise ConfigError(f"parallel.ep = {par.ep} is invalid: must divide the expert count of "
                                  f"every MoE layer (layer {layer} has {experts})")
    if train.batch_size % world_size:
        raise ConfigError(f"train.batch_size = {train.batch_size} is invalid on {world_size} processes: "
                          "it is the global batch and must be divisible by the number of processes")
    return Layout(world_size=world_size, rank=rank, local_rank=local_rank,
                  dp_replicate=world_size // dp_shard, dp_shard=dp_shard, ep=par.ep)


def layout_from_env(cfg: Config) -> Layout:
    world, rank, local_rank = env_world()
    return plan_layout(cfg, world, rank, local_rank)


def device_for(layout: Layout, requested: str) -> torch.device:
    """The device this process trains on: its own GPU under torchrun (LOCAL_RANK), else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' is invalid: no CUDA device is available")
        if layout.distributed:
            if layout.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {layout.local_rank} has no GPU: this node has "
                                  f"{torch.cuda.device_count()} (start at most that many processes per node)")
            return torch.device("cuda", layout.local_rank)
        return torch.device("cuda")
    return torch.device(requested)


def pick_device(name: str) -> torch.device:
    """The device a one-process command (eval, inspect, ...) runs on."""
    return device_for(Layout(), name)
