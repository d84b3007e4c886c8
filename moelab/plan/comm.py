"""Bytes each GPU moves in a training step: expert-parallel all-to-all and FSDP collectives.

All-to-all (GShard, Lepikhin et al. 2021; the dispatch / combine pair): with uniform routing each
of a GPU's T tokens sends k rows of d_model activations to the ranks holding its experts and gets
them back, so one MoE layer's forward moves ``2 x T x k x d_model x bytes`` through
``all_to_all_single``, of which ``(ep - 1) / ep`` leaves the GPU. The backward sends the gradients
of both exchanges back the same way (the same volume again); activation checkpointing repeats
the forward exchange when it recomputes the block.

Placement: EP is the innermost mesh dimension (consecutive ranks), as in torchtitan, so an EP
group no wider than a node stays on NVLink. A wider group spans ``ep / gpus_per_node`` nodes and,
with uniform routing, ``(ep - gpus_per_node) / ep`` of the rows cross the network.

Node-limited routing (DeepSeek-V3, sec. 2.1.2): with the experts' groups placed one set per node,
a token's experts lie in at most ``topk_groups`` groups; a dispatcher that sends a token once per
destination node and fans it out over NVLink (DeepSeek's, DeepEP) moves
``E[#remote nodes touched] x d_model`` per token across the network instead of
``k x d_model x (remote share)``. Reported beside the plain figure; moelab's own exchange sends
every (token, expert) row.

FSDP2 collectives (Zhao et al. 2023, "PyTorch FSDP"): per micro-batch each block is all-gathered
for the forward and again for the backward (reshard after forward; the root unit, which FSDP2 does
not reshard after its forward, once), and every unit's gradient is reduce-scattered; a ring all-gather or reduce-scatter over n ranks moves (n - 1) / n of the full
tensor through every rank's link (NCCL's bus-bandwidth convention). HSDP adds an all-reduce of
the gradient shard over the replicas, 2 (r - 1) / r of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from moelab.config import ModelConfig
from moelab.plan.counts import ModelCounts
from moelab.plan.inputs import Hardware, Layout, Workload


@dataclass(frozen=True)
class AllToAll:
    """Per MoE layer, per GPU, one training step's forward (dispatch + combine)."""

    bytes_per_layer: float               # rows that leave the GPU (the definition)
    bytes_per_layer_with_local: float    # every row given to all_to_all_single, own rows included
    intra_node_bytes_per_layer: float
    inter_node_bytes_per_layer: float
    inter_node_bytes_per_layer_once_per_node: float  # each token once per remote node (DeepEP; node-limited routing applied)
    moe_layers: int
    exchanges_per_step: int              # forward + backward (+ recompute)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_per_layer * self.moe_layers * self.exchanges_per_step

    @property
    def bytes_per_step_with_local(self) -> float:
        return self.bytes_per_layer_with_local * self.moe_layers * self.exchanges_per_step

    def seconds_per_step(self, hw: Hardware) -> float:
        """Intra- and inter-node traffic run concurrently on their own links."""
        per_layer = max(self.intra_node_bytes_per_layer / hw.intra_node_bw,
                        self.inter_node_bytes_per_layer / hw.inter_node_bw)
        return per_layer * self.moe_layers * self.exchanges_per_step


@dataclass(frozen=True)
class Collectives:
    """FSDP2 bytes one GPU sends (= receives) per step, and where they travel."""

    allgather_bytes: float
    reduce_scatter_bytes: float
    replicate_allreduce_bytes: float
    seconds: float
    unit_seconds: float          # one all-gather + one reduce-scatter of the largest unit

    @property
    def bytes_per_step(self) -> float:
        return self.allgather_bytes + self.reduce_scatter_bytes + self.replicate_allreduce_bytes


def tokens_per_gpu(hw: Hardware, wl: Workload) -> float:
    """T: this GPU's share of the step's tokens (every rank is a data-parallel rank)."""
    return wl.global_batch_tokens / hw.gpus


def _group_within_node(size: int, stride: int, hw: Hardware) -> bool:
    """A group of ``size`` ranks ``stride`` apart, starting at a multiple of size * stride."""
    return size * stride <= hw.gpus_per_node or size == 1


def alltoall(cfg: ModelConfig, counts: ModelCounts, layout: Layout, hw: Hardware, wl: Workload) -> AllToAll:
    e, g = layout.ep, hw.gpus_per_node
    exchanges = 3 if layout.activation_checkpointing else 2
    if e == 1 or counts.moe_layers == 0:
        return AllToAll(0.0, 0.0, 0.0, 0.0, 0.0, counts.moe_layers, exchanges)
    T = tokens_per_gpu(hw, wl)
    row = cfg.d_model * wl.act_bytes
    with_local = 2 * T * counts.top_k * row
    remote = with_local * (e - 1) / e
    if e <= g:
        intra, inter = remote, 0.0
    else:
        intra = with_local * (g - 1) / e
        inter = with_local * (e - g) / e
    return AllToAll(remote, with_local, intra, inter, _node_limited(cfg, e, g) * 2 * T * row,
                    counts.moe_layers, exchanges)


def _node_limited(cfg: ModelConfig, e: int, g: int) -> float:
    """Expected remote nodes a token's k experts touch, uniform routing, one send per node."""
    if e <= g:
        return 0.0
    nodes = e // g
    m = cfg.moe
    E = cfg.experts_in_layer(cfg.moe_layer_indices()[0])
    if m.n_groups > 1 and m.n_groups % nodes == 0:
        # the chosen topk_groups of n_groups groups are uniform; a node holds n_groups / nodes
        pool, chosen, per_node = m.n_groups, m.topk_groups, m.n_groups // nodes
    else:
        pool, chosen, per_node = E, m.top_k, E // nodes
    p_touched = 1 - comb(pool - per_node, chosen) / comb(pool, chosen)
    return (nodes - 1) * p_touched


def fsdp(counts: ModelCounts, layout: Layout, hw: Hardware, wl: Workload, micro_batches: float) -> Collectives:
    s, e, r = layout.dp_shard, layout.ep, layout.dp_replicate
    es = layout.expert_shard
    root = counts.units[0].params
    blocks = counts.non_expert_params - root
    routed_local = counts.routed_expert_params / e          # this EP rank's experts, unsharded
    pb, rb = wl.compute_param_bytes, wl.reduce_bytes
    bw_dense = hw.intra_node_bw if _group_within_node(s, 1, hw) else hw.inter_node_bw
    bw_expert = hw.intra_node_bw if _group_within_node(es, e, hw) else hw.inter_node_bw
    bw_rep = hw.intra_node_bw if _group_within_node(r, s, hw) else hw.inter_node_bw

    def ring(total: float, n: int) -> float:
        return total * (n - 1) / n if n > 1 else 0.0

    # blocks are gathered for the forward and again for the backward; the root stays gathered
    ag_dense = ring((root + 2 * blocks) * pb, s)
    ag_expert = 2 * ring(routed_local * pb, es)
    rs_dense, rs_expert = ring((root + blocks) * rb, s), ring(routed_local * rb, es)
    rep = 2 * ring(counts.total_params / s * rb, r)
    seconds = micro_batches * ((ag_dense + rs_dense) / bw_dense + (ag_expert + rs_expert) / bw_expert
                               + rep / bw_rep)
    unit = max(u.params for u in counts.units)
    unit_s = (ring(unit * pb, s) + ring(unit * rb, s)) / bw_dense
    return Collectives(micro_batches * (ag_dense + ag_expert), micro_batches * (rs_dense + rs_expert),
                       micro_batches * rep, seconds, micro_batches * unit_s)

