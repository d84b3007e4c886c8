"""The inputs of a plan: hardware, workload and one parallel layout, as small frozen records.

A layout is what ``parallel.*`` and ``train.*`` choose for a run under torchrun (issue 13's names):
``dp_shard`` ranks shard every parameter with FSDP2, ``dp_replicate = gpus / dp_shard`` copies of
that group replicate it (HSDP), ``ep`` ranks taken from the sharding group split each MoE layer's
experts, whose weights FSDP then shards over the remaining ``dp_shard / ep`` ranks (torchtitan's
2-D mesh). Every rank is a data-parallel rank: each processes its own micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpus: int
    gpu_memory: int                      # bytes per GPU
    gpus_per_node: int = 8
    intra_node_bw: float = 450e9         # bytes/s per GPU, each direction (H100 NVLink 4)
    inter_node_bw: float = 50e9          # bytes/s per GPU, each direction (one 400 Gb/s NIC)
    peak_flops: float = 989e12           # dense FLOP/s per GPU at the training dtype (H100 SXM bf16)
    compute_efficiency: float = 0.5      # fraction of peak the step's FLOPs run at
    memory_margin: float = 0.1           # fraction of gpu_memory kept for context, NCCL, fragmentation

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1 - self.memory_margin)


@dataclass(frozen=True, kw_only=True)
class Workload:
    seq_len: int = 4096
    global_batch_tokens: float = 4e6     # tokens per optimizer step, all GPUs together
    dtype: Precision = "bf16"

    @property
    def act_bytes(self) -> int:
        """Activations and the all-to-all payload."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def compute_param_bytes(self) -> int:
        """Parameters as the matmuls see them: FSDP2's all-gathered copies (param_dtype)."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def master_bytes(self) -> int:
        """Sharded parameters as stored, their gradients and each Adam moment: fp32."""
        return 4

    @property
    def reduce_bytes(self) -> int:
        """Gradients in the reduce-scatter (FSDP2 reduce_dtype): fp32."""
        return 4

    @property
    def mixed(self) -> bool:
        return self.dtype != "fp32"


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp_shard: int
    dp_replicate: int = 1
    ep: int = 1
    activation_checkpointing: bool = False
    micro_batch: int = 1                 # sequences per GPU per micro-batch

    @property
    def world(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def expert_shard(self) -> int:
        """FSDP degree of expert weights: the sharding ranks left over by EP."""
        return self.dp_shard // self.ep

    def label(self) -> str:
        parts = [f"shard {self.dp_shard}"]
        if self.dp_replicate > 1:
            parts.append(f"x replicate {self.dp_replicate}")
        parts.append(f"ep {self.ep}")
        return " ".join(parts)
