"""Expert parallelism: each MoE layer's experts split evenly over the ``ep`` ranks of a group, with
tokens travelling to their experts and back by all-to-all (GShard, Lepikhin et al. 2020).

Legend: N tokens, D width, E experts, El = E / P experts per rank, P ranks in the expert group,
M assignments this rank sends, R rows this rank's experts receive.

The MoE layer routes and plans exactly as in one process; only the dispatcher differs
(``MoE.dispatcher``): the one-process :class:`~moelab.model.moe.dispatch.LocalDispatcher` runs
gather -> experts -> weighted scatter fused, and :class:`AllToAllDispatcher` runs

    permute (M rows, by global expert) -> exchange counts -> all-to-all rows -> sort by local
    expert -> experts -> unsort -> all-to-all back -> weighted scatter-add to the N tokens

Routing weights are applied on the sending rank after the rows come back, so their gradient stays
local. Expert weights become DTensors sharded on dim 0 over the expert mesh, so checkpoints keep
one global (E, ...) tensor per weight and load at any other expert-parallel degree.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moelab.model.moe.dispatch import DispatchPlan, permute, unpermute
from moelab.parallel.comm import CommMeter, all_to_all_counts, all_to_all_rows


class AllToAllDispatcher:
    """Token exchange for one MoE layer whose experts are spread over ``group``."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, meter: Optional[CommMeter] = None):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ranks
        self.meter = meter

    def __call__(self, x_ND: torch.Tensor, plan: DispatchPlan, experts: nn.Module) -> torch.Tensor:
        P, El = self.ranks, self.local_experts
        x_MD = permute(x_ND, plan)                                        # (M, D) by global expert
        send_PEl = plan.counts_E.view(P, El)                              # rows for rank p, expert j
        recv_PEl = all_to_all_counts(plan.counts_E, self.group).view(P, El)  # rows from rank p for my j
        # the split sizes must be known on the host to size the exchange (one sync per layer)
        send_splits = send_PEl.sum(dim=1).tolist()
        recv_splits = recv_PEl.sum(dim=1).tolist()
        x_RD = all_to_all_rows(x_MD, send_splits, recv_splits, self.group, self.meter)  # by (p, j)
        order_R = _group_by_local_expert(recv_PEl)                        # (p, j) order -> (j, p)
        y_RD = experts(x_RD.index_select(0, order_R), recv_PEl.sum(dim=0))   # (R, D) by (j, p)
        y_RD = torch.empty_like(y_RD).index_copy(0, order_R, y_RD)        # back to (p, j) order
        y_MD = all_to_all_rows(y_RD, recv_splits, send_splits, self.group, self.meter)
        return unpermute(y_MD, plan)                                      # (N, D)


def _group_by_local_expert(recv_PEl: torch.Tensor) -> torch.Tensor:
    """Received rows arrive grouped by source rank, then local expert; the experts want them
    grouped by local expert. Returns, for each output position, the received row to take."""
    P, El = recv_PEl.shape
    chunk_R = torch.repeat_interleave(torch.arange(P * El, device=recv_PEl.device),
                                      recv_PEl.flatten())                 # chunk p * El + j of each row
    key_R = (chunk_R % El) * P + chunk_R // El                            # j-major, then p
    return torch.argsort(key_R, stable=True)


def shard_experts(model: nn.Module, ep_mesh: DeviceMesh, meter: Optional[CommMeter] = None) -> int:
    """Give every MoE layer its local experts and an all-to-all dispatcher over ``ep_mesh``.
    Every rank must hold the same full weights when this runs (same seed or the same checkpoint);
    returns the number of layers changed."""
    from moelab.model.moe import MoE
    group = ep_mesh.get_group()
    changed = 0
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name in ("w_gate_up", "w_down"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)]),
                                                requires_grad=full.requires_grad))
        module.dispatcher = AllToAllDispatcher(group, module.num_experts, meter)
        changed += 1
    return changed
