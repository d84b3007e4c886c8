"""Token dispatch: group the (token, expert) assignments by expert and scatter results back.

Legend: N tokens, D width, E experts, K experts per token, M = rows sent to experts (N*K when
dropless, fewer after capacity dropping).

Permutation is kept apart from expert compute so that expert parallelism can slot in between:
``permute`` -> (all-to-all to the ranks owning the experts) -> experts -> (all-to-all back) ->
``unpermute``. Dropless dispatch needs no host synchronisation: every size is N*K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moelab.model.moe.losses import expert_histogram
from moelab.model.moe.router import Routing


@dataclass
class DispatchPlan:
    token_idx_M: torch.Tensor   # source token of each expert-sorted row, (M,) int64
    weight_M: torch.Tensor      # combine weight of each row, (M,) float32 (carries gradient)
    counts_E: torch.Tensor      # rows per expert, (E,) int64; sums to M
    num_tokens: int
    # flat assignment (n * K + k) of each row, (M,) int64: the slot a deterministic combine
    # writes to (see experts.RowMap)
    assign_idx_M: Optional[torch.Tensor] = None
    top_k: int = 1


def plan_dispatch(routing: Routing, num_experts: int, keep_NK: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Sort assignments by expert (stable, so each expert sees its tokens in order)."""
    ids_NK = routing.ids_NK
    N, K = ids_NK.shape
    flat_ids = ids_NK.flatten()                                       # (N*K,)
    if keep_NK is None:
        # A comparison sort of N*K small integers; a counting sort (bincount + cumsum + rank
        # within expert) would be O(N*K) but needs the rank, which costs an (N*K, E) one-hot
        # or a sort anyway. Measured: argsort of 65k ids takes < 1 ms next to ~100 ms of GEMMs.
        order = torch.argsort(flat_ids, stable=True)
        counts_E = expert_histogram(flat_ids, num_experts)
    else:
        keep = keep_NK.flatten()
        sort_key = torch.where(keep, flat_ids, num_experts)           # dropped rows sort last
        counts_E = expert_histogram(flat_ids, num_experts, keep)
        order = torch.argsort(sort_key, stable=True)[: int(keep.sum())]  # one sync, capacity only
    return DispatchPlan(
        token_idx_M=order // K,
        weight_M=routing.weights_NK.flatten()[order],
        counts_E=counts_E,
        num_tokens=N,
        assign_idx_M=order,
        top_k=K,
    )


class LocalDispatcher:
    """Every expert lives in this process: gather -> experts -> weighted scatter as one fused pass
    (``GroupedExperts.forward_dispatched``). Expert parallelism swaps in
    ``moelab.parallel.expert_parallel.AllToAllDispatcher``, which has the same call."""

    def __call__(self, x_ND: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
        return experts.forward_dispatched(x_ND, plan)


def permute(x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows for the experts, grouped by expert: (M, D)."""
    return x_ND.index_select(0, plan.token_idx_M)


def unpermute(y_MD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weight each expert output and add it back to its token: (N, D)."""
    weighted_MD = y_MD * plan.weight_M.unsqueeze(-1).to(y_MD.dtype)
    out_ND = y_MD.new_zeros(plan.num_tokens, y_MD.shape[-1])
    return out_ND.index_add(0, plan.token_idx_M, weighted_MD)
