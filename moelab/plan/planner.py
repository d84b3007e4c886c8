"""The plan: every layout evaluated (memory, communication, step time), the best one named, and
``predict`` for the one layout a real run uses, so that a test can put the two side by side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from moelab.config import Config, ConfigError, ModelConfig
from moelab.plan import comm
from moelab.plan.counts import ModelCounts, count
from moelab.plan.inputs import Hardware, Layout, Workload
from moelab.plan.layouts import enumerate_layouts, valid_ep
from moelab.plan.memory import MemoryBreakdown, memory
from moelab.plan.source import ModelSource
from moelab.plan.steptime import StepTime, step_time


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    memory: MemoryBreakdown
    alltoall: comm.AllToAll
    collectives: comm.Collectives
    time: StepTime
    grad_accum: int
    usable_memory: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_memory

    @property
    def overflow_bytes(self) -> int:
        return max(0, int(self.memory.total - self.usable_memory))

    @property
    def headroom_bytes(self) -> int:
        return int(self.usable_memory - self.memory.total)

    def overflow_parts(self) -> list[tuple[str, int]]:
        """The memory parts, largest first: what to cut when the layout does not fit."""
        parts = {k: v for k, v in self.memory.as_dict().items() if k != "total"}
        return sorted(parts.items(), key=lambda kv: -kv[1])

    def to_dict(self, tokens_per_day: float) -> dict:
        lay, a, c, t = self.layout, self.alltoall, self.collectives, self.time
        return {
            "dp_shard": lay.dp_shard, "dp_replicate": lay.dp_replicate, "ep": lay.ep,
            "expert_shard": lay.expert_shard,
            "activation_checkpointing": lay.activation_checkpointing,
            "micro_batch_size": lay.micro_batch, "grad_accum": self.grad_accum,
            "memory_bytes_per_gpu": self.memory.total, "memory": self.memory.as_dict(),
            "fits": self.fits, "headroom_bytes": self.headroom_bytes, "overflow_bytes": self.overflow_bytes,
            "alltoall_bytes_per_layer_per_gpu": a.bytes_per_layer,
            "alltoall_bytes_per_layer_per_gpu_with_local": a.bytes_per_layer_with_local,
            "alltoall_intra_node_bytes_per_layer_per_gpu": a.intra_node_bytes_per_layer,
            "alltoall_inter_node_bytes_per_layer_per_gpu": a.inter_node_bytes_per_layer,
            "alltoall_inter_node_bytes_per_layer_per_gpu_once_per_node": a.inter_node_bytes_per_layer_once_per_node,
            "alltoall_bytes_per_step_per_gpu": a.bytes_per_step,
            "alltoall_bytes_per_step_per_gpu_with_local": a.bytes_per_step_with_local,
            "fsdp_allgather_bytes_per_step_per_gpu": c.allgather_bytes,
            "fsdp_reduce_scatter_bytes_per_step_per_gpu": c.reduce_scatter_bytes,
            "fsdp_replicate_allreduce_bytes_per_step_per_gpu": c.replicate_allreduce_bytes,
            "fsdp_bytes_per_step_per_gpu": c.bytes_per_step,
            "compute_s": t.compute_s, "alltoall_s": t.alltoall_s, "fsdp_s": t.fsdp_s,
            "fsdp_exposed_s": t.fsdp_exposed_s, "step_time_s": t.step_s,
            "step_time_no_overlap_s": t.step_no_overlap_s, "mfu": t.mfu,
            "comm_share": t.comm_share, "alltoall_share": t.alltoall_share,
            "tokens_per_day": tokens_per_day,
        }


@dataclass(frozen=True)
class Plan:
    source: ModelSource
    counts: ModelCounts
    hardware: Hardware
    workload: Workload
    layouts: tuple[LayoutPlan, ...]
    notes: tuple[str, ...] = ()
    advice: Optional[dict] = field(default=None, compare=False)

    @property
    def tokens_per_gpu(self) -> float:
        return comm.tokens_per_gpu(self.hardware, self.workload)

    @property
    def best(self) -> Optional[LayoutPlan]:
        """The fastest layout that fits; among equals, the one with the most headroom."""
        fitting = [p for p in self.layouts if p.fits]
        if not fitting:
            return None
        return min(fitting, key=lambda p: (round(p.time.step_s, 9), -p.headroom_bytes))

    @property
    def smallest(self) -> LayoutPlan:
        return min(self.layouts, key=lambda p: (p.memory.total, p.time.step_s))

    def tokens_per_day(self, p: LayoutPlan) -> float:
        return self.workload.global_batch_tokens / p.time.step_s * 86400 if p.time.step_s else 0.0

    def per_pair(self) -> list[LayoutPlan]:
        """One row per (dp_shard, ep): its fastest fitting variant, else its smallest, fitting
        first and fastest first."""
        groups: dict[tuple[int, int], list[LayoutPlan]] = {}
        for p in self.layouts:
            groups.setdefault((p.layout.dp_shard, p.layout.ep), []).append(p)
        rows = []
        for plans in groups.values():
            fitting = [p for p in plans if p.fits]
            rows.append(min(fitting, key=lambda p: p.time.step_s) if fitting
                        else min(plans, key=lambda p: p.memory.total))
        return sorted(rows, key=lambda p: (not p.fits, p.time.step_s if p.fits else p.memory.total))

    def to_dict(self) -> dict:
        best = self.best
        out = {
            "model": self.source.name, "family": self.source.family,
            **self.counts.as_dict(),
            "hardware": {"gpus": self.hardware.gpus, "gpu_memory_bytes": self.hardware.gpu_memory,
                         "gpus_per_node": self.hardware.gpus_per_node, "nodes": self.hardware.nodes,
                         "intra_node_bw_bytes_per_s": self.hardware.intra_node_bw,
                         "inter_node_bw_bytes_per_s": self.hardware.inter_node_bw,
                         "peak_flops": self.hardware.peak_flops,
                         "compute_efficiency": self.hardware.compute_efficiency,
                         "memory_margin": self.hardware.memory_margin,
                         "usable_memory_bytes": self.hardware.usable_memory},
            "workload": {"seq_len": self.workload.seq_len,
                         "global_batch_tokens": self.workload.global_batch_tokens,
                         "dtype": self.workload.dtype, "tokens_per_gpu_per_step": self.tokens_per_gpu},
            "layouts": [p.to_dict(self.tokens_per_day(p)) for p in self.layouts],
            "best_layout": best.to_dict(self.tokens_per_day(best)) if best else None,
            "notes": list(self.source.notes) + list(self.notes),
        }
        if self.advice is not None:
            out["advice"] = self.advice
        return out


def evaluate(cfg: ModelConfig, counts: ModelCounts, layout: Layout, hw: Hardware, wl: Workload) -> LayoutPlan:
    T = comm.tokens_per_gpu(hw, wl)
    accum = max(1, math.ceil(T / (layout.micro_batch * wl.seq_len) - 1e-9))
    a2a = comm.alltoall(cfg, counts, layout, hw, wl)
    coll = comm.fsdp(counts, layout, hw, wl, accum)
    return LayoutPlan(layout, memory(cfg, counts, layout, wl), a2a, coll,
                      step_time(counts, layout, hw, T, a2a, coll), accum, hw.usable_memory)


def plan(source: ModelSource, hw: Hardware, wl: Workload) -> Plan:
    cfg = source.config.model
    if hw.gpus < 1:
        raise ConfigError(f"--gpus = {hw.gpus} is invalid: must be >= 1")
    counts = count(cfg, wl.seq_len, source.mtp_layers)
    notes = []
    if wl.seq_len > cfg.max_seq_len:
        notes.append(f"--seq-len {wl.seq_len} is longer than the model's context ({cfg.max_seq_len}); "
                     "planned anyway (RoPE has no parameters), but training there needs model.max_seq_len raised")
    sequences = comm.tokens_per_gpu(hw, wl) / wl.seq_len
    if sequences < 1:
        notes.append(f"{wl.global_batch_tokens:,.0f} tokens per step over {hw.gpus} GPUs is less than one "
                     f"{wl.seq_len}-token sequence per GPU; planned with one sequence per GPU's micro-batch")
    layouts = tuple(evaluate(cfg, counts, lay, hw, wl) for lay in enumerate_layouts(cfg, hw.gpus, sequences))
    return Plan(source, counts, hw, wl, layouts, tuple(notes))


# ---------------------------------------------------------------------------------------------
# one real run's layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """What the planner expects a run of ``cfg`` on ``world_size`` processes to log, per rank
    (uniform routing makes every rank alike): peak memory above the pre-model baseline, and the
    bytes each rank passes to all_to_all_single and to FSDP collectives in one optimizer step."""

    layout: Layout
    workload: Workload
    memory: MemoryBreakdown
    memory_bytes_per_rank: list[int]
    # every row given to all_to_all_single: with dropless routing half of it (own rows out, their
    # gradients back) is exact per rank and the sum over ranks is exact; the rest follows the routing
    alltoall_bytes_with_local_per_rank: list[int]
    alltoall_bytes_per_rank: list[int]              # rows leaving the rank, uniform routing
    fsdp_bytes_per_rank: list[int]
    exact_alltoall: bool                            # False with capacity dropping (fewer rows sent)


def layout_of(cfg: Config, world_size: int) -> Layout:
    par = cfg.parallel
    s = world_size if par.dp_shard == -1 else par.dp_shard
    if world_size < 1:
        raise ConfigError(f"world_size = {world_size} is invalid: must be >= 1")
    if world_size % s:
        raise ConfigError(f"parallel.dp_shard = {s} is invalid: must divide the world size ({world_size})")
    if s % par.ep or par.ep not in valid_ep(cfg.model, s):
        raise ConfigError(f"parallel.ep = {par.ep} is invalid: must divide parallel.dp_shard ({s}) and every "
                          "MoE layer's expert count")
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is invalid: the global batch must split "
                          f"evenly over {world_size} processes")
    return Layout(dp_shard=s, dp_replicate=world_size // s, ep=par.ep,
                  activation_checkpointing=par.activation_checkpointing,
                  micro_batch=cfg.train.batch_size // world_size)


def predict(cfg: Config, world_size: int, *, device: str = "cpu", gpus_per_node: Optional[int] = None) -> Prediction:
    """The planner's figures for the exact layout ``cfg.parallel`` gives on ``world_size`` ranks.

    ``train.batch_size`` is the global micro-batch (sequences, split over the ranks), repeated
    ``train.grad_accum`` times per step. On CPU everything is fp32 (moelab trains fp32 there); on
    CUDA the compute dtype is bf16 with fp32 master weights, gradients and moments."""
    layout = layout_of(cfg, world_size)
    t = cfg.train
    wl = Workload(seq_len=t.seq_len, global_batch_tokens=t.batch_size * t.seq_len * t.grad_accum,
                  dtype="fp32" if device == "cpu" else "bf16")
    hw = Hardware(gpus=world_size, gpu_memory=2**62, gpus_per_node=gpus_per_node or world_size)
    counts = count(cfg.model, t.seq_len)
    p = evaluate(cfg.model, counts, layout, hw, wl)
    mem = p.memory.total
    return Prediction(layout, wl, p.memory, [mem] * world_size,
                      [round(p.alltoall.bytes_per_step_with_local)] * world_size,
                      [round(p.alltoall.bytes_per_step)] * world_size,
                      [round(p.collectives.bytes_per_step)] * world_size,
                      cfg.model.moe.capacity_factor is None)
