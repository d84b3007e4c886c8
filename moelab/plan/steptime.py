"""Step time from compute and bandwidth, and the MFU it implies.

Compute: the step's hardware FLOPs on this GPU (``3 x forward``, ``4 x`` with activation
checkpointing; Narayanan et al. 2021) at ``peak x compute_efficiency``. One efficiency for all
kernels is the model's main simplification: small expert GEMMs, attention and memory-bound
element-wise kernels run below large-GEMM speed; docs/plan.md compares the result with published
runs.

Overlap: FSDP2 prefetches the next unit's all-gather and reduce-scatters the previous unit's
gradient while the current one computes, so FSDP traffic hides behind compute except the first
all-gather and last reduce-scatter of each micro-batch (and whatever exceeds the compute time).
moelab's expert-parallel exchange does not overlap: the experts wait for their tokens, and the
combine waits for the experts. So

    step = max(compute, fsdp) + fsdp_edges + alltoall

and ``step_time_no_overlap_s = compute + fsdp + alltoall`` is reported beside it as the bound
for a run where nothing overlaps. The optimizer update and the data loader are not modelled.
MFU counts model FLOPs (3 x forward, no recomputation) over ``step x peak``, as PaLM (Chowdhery
et al. 2022) defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.plan.comm import AllToAll, Collectives
from moelab.plan.counts import ModelCounts
from moelab.plan.inputs import Hardware, Layout


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    alltoall_s: float
    fsdp_s: float
    fsdp_exposed_s: float
    step_s: float
    step_no_overlap_s: float
    mfu: float

    @property
    def comm_share(self) -> float:
        """Share of the step the GPU waits for communication."""
        return (self.step_s - self.compute_s) / self.step_s if self.step_s else 0.0

    @property
    def alltoall_share(self) -> float:
        return self.alltoall_s / self.step_s if self.step_s else 0.0


def step_time(counts: ModelCounts, layout: Layout, hw: Hardware, tokens_per_gpu: float,
              a2a: AllToAll, coll: Collectives) -> StepTime:
    flops = counts.hardware_flops_per_token(layout.activation_checkpointing) * tokens_per_gpu
    compute = flops / (hw.peak_flops * hw.compute_efficiency)
    a2a_s = a2a.seconds_per_step(hw)
    exposed = max(0.0, coll.seconds - compute) + min(coll.unit_seconds, coll.seconds)
    step = compute + exposed + a2a_s
    mfu = counts.training_flops_per_token * tokens_per_gpu / (step * hw.peak_flops) if step else 0.0
    return StepTime(compute, a2a_s, coll.seconds, exposed, step, compute + coll.seconds + a2a_s, mfu)
