"""Heterogeneous experts (HMoE, Wang et al. 2024): routed experts of different widths.

Legend: N tokens, D width, E experts, M dispatched rows, W distinct widths, Eg experts of one width.

The experts are grouped by width, and each group is an ordinary :class:`GroupedExperts`, so every
group still runs as grouped GEMMs over its own experts' contiguous rows. The router and the
dispatch plan do not change: the plan's rows are sorted by expert, so the rows of one width's
experts, taken in order, are sorted by that group's local expert index; each group runs its
rows fused (gather -> GEMMs -> weighted scatter-add) and the groups' outputs are summed.

Cost: one host read per layer to size each group's rows (the loop engine reads its counts anyway),
and one (N, D) sum per extra width. Expert parallelism is not supported (the config refuses it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from moelab.model.moe.experts import GroupedExperts

if TYPE_CHECKING:
    from moelab.model.moe.dispatch import DispatchPlan


class HeteroExperts(nn.Module):
    """E SwiGLU experts, expert ``e`` of hidden width ``widths[e]``, in one GroupedExperts per
    distinct width (``groups[g]`` holds the experts of ``group_widths[g]``, in expert order)."""

    def __init__(self, widths: tuple[int, ...], d_model: int, backend: str = "auto"):
        super().__init__()
        self.widths = tuple(widths)
        self.num_experts, self.d_model = len(widths), d_model
        self.group_widths = tuple(sorted(set(widths)))
        self.members = [[e for e, w in enumerate(widths) if w == gw] for gw in self.group_widths]
        self.groups = nn.ModuleList(GroupedExperts(len(m), d_model, gw, backend=backend)
                                    for gw, m in zip(self.group_widths, self.members))
        group_of = [self.group_widths.index(w) for w in widths]
        local = [self.members[g].index(e) for e, g in enumerate(group_of)]
        self.register_buffer("group_of_expert", torch.tensor(group_of), persistent=False)   # (E,)
        self._where = list(zip(group_of, local))           # expert -> (group, index in group)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the expert -> group map when built on the meta device (``MoE.init_buffers``)."""
        if self.group_of_expert.is_meta:
            self.group_of_expert = torch.tensor([g for g, _ in self._where], device=device)

    def _group_rows(self, counts_E: torch.Tensor, num_rows: int) -> list[torch.Tensor]:
        """For each group, the positions of its rows among the expert-sorted rows (in order)."""
        expert_M = torch.repeat_interleave(torch.arange(self.num_experts, device=counts_E.device),
                                           counts_E, output_size=num_rows)
        group_M = self.group_of_expert.to(counts_E.device)[expert_M]
        return [torch.nonzero(group_M == g).squeeze(1) for g in range(len(self.groups))]

    def forward_dispatched(self, x_ND: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
        """Each width's experts run their rows of ``plan`` fused; outputs summed: (N, D)."""
        out_ND = None
        rows = self._group_rows(plan.counts_E, plan.token_idx_M.shape[0])
        for group, members, sel in zip(self.groups, self.members, rows):
            sub = dataclasses.replace(
                plan, token_idx_M=plan.token_idx_M[sel], weight_M=plan.weight_M[sel],
                counts_E=plan.counts_E[members],
                assign_idx_M=None if plan.assign_idx_M is None else plan.assign_idx_M[sel])
            y_ND = group.forward_dispatched(x_ND, sub)
            out_ND = y_ND if out_ND is None else out_ND + y_ND
        return out_ND

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows in, expert outputs out, (M, D) -> (M, D), as GroupedExperts."""
        y_MD = None
        for group, members, sel in zip(self.groups, self.members, self._group_rows(counts_E, x_MD.shape[0])):
            y_RD = group(x_MD.index_select(0, sel), counts_E[members])
            if y_MD is None:
                y_MD = y_RD.new_zeros(x_MD.shape[0], y_RD.shape[1])
            y_MD = y_MD.index_copy(0, sel, y_RD)
        return y_MD

    def expert_forward(self, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on a few rows, inference only (decoding)."""
        g, i = self._where[e]
        return self.groups[g].expert_forward(i, x_RD)

    def naive_expert(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on one token, written plainly: the reference for tests."""
        g, i = self._where[e]
        return self.groups[g].naive_expert(i, x_D)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for group in self.groups:
            nn.init.normal_(group.w_gate_up, std=std)
            nn.init.normal_(group.w_down, std=out_std)
