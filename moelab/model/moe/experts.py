"""Routed experts as two stacked weights, run as grouped GEMMs over expert-sorted rows.

Legend: N tokens, M rows (expert-sorted assignments), R rows, D width, H expert hidden,
E experts.

Weights use the (out, in) layout of ``nn.Linear`` and Hugging Face's fused experts:
``w_gate_up`` (E, 2H, D) with the gate rows first, ``w_down`` (E, D, H). Every expert computes
``down(silu(gate(x)) * up(x))``. The products and their backward live in ``grouped_swiglu``,
the tiling in ``tiles``, the choice of engine in ``engines``; ``naive_expert`` is the per-token
reference every engine is tested against.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.model.moe.engines import BACKENDS, choose_engine
from moelab.model.moe.grouped_swiglu import GroupedSwiGLU, RowMap
from moelab.model.moe.tiles import Tile, grouped_tiles, loop_tiles

try:  # expert parallelism hands the experts DTensor weights; builds without distributed have none
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    class DTensor:  # type: ignore[no-redef]
        pass

if TYPE_CHECKING:  # pragma: no cover
    from moelab.model.moe.dispatch import DispatchPlan


class GroupedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights.

    ``backend``: "auto" (grouped_mm on CUDA, loop on CPU; see ``engines``), "grouped_mm" or
    "loop". ``deterministic``: combine by fixed-order sums instead of an accumulating scatter
    (whose order of additions may vary on CUDA); None follows
    ``torch.use_deterministic_algorithms``.
    """

    weight_format = "float"

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto",
                 deterministic: Optional[bool] = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GroupedExperts.backend = {backend!r} is invalid: must be one of {BACKENDS}")
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.backend = backend
        self.deterministic = deterministic
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if isinstance(w_gate_up, DTensor):
            # expert parallelism (moelab.parallel): this rank's experts, a differentiable view
            w_gate_up, w_down = w_gate_up.to_local(), w_down.to_local()
        # ``.to`` is a no-op at the parameters' dtype and differentiable otherwise (bf16 compute
        # over fp32 master weights)
        return w_gate_up.to(dtype), w_down.to(dtype)

    def _tiles(self, x: torch.Tensor, counts_E: torch.Tensor, num_rows: int,
               engine_rows: Optional[int]) -> list[Tile]:
        if choose_engine(self, x, engine_rows) == "grouped_mm":
            return grouped_tiles(counts_E, num_rows)
        return loop_tiles(counts_E)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows in, expert outputs out, (M, D) -> (M, D); ``counts_E`` rows per
        expert. The unfused form: ``permute``, then this, then ``unpermute``."""
        x_MD = _compute_dtype(x_MD)
        w_gate_up, w_down = self._weights(x_MD.dtype)
        M = x_MD.shape[0]
        return GroupedSwiGLU.apply(x_MD, w_gate_up, w_down, None, RowMap(),
                                   self._tiles(x_MD, counts_E, M, None), M)

    def forward_dispatched(self, x_ND: torch.Tensor, plan: "DispatchPlan") -> torch.Tensor:
        """``unpermute(self(permute(x_ND, plan), plan.counts_E), plan)`` in one pass: (N, D).

        The sorted (M, D) rows are never materialised whole; each tile gathers its rows from
        ``x_ND`` and adds its weighted outputs straight back to their tokens."""
        x_ND = _compute_dtype(x_ND)
        w_gate_up, w_down = self._weights(x_ND.dtype)
        M = plan.token_idx_M.shape[0]
        deterministic = self.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        rows = RowMap(source_M=plan.token_idx_M, num_tokens=plan.num_tokens, top_k=plan.top_k,
                      slot_M=plan.assign_idx_M if deterministic else None)
        return GroupedSwiGLU.apply(x_ND, w_gate_up, w_down, plan.weight_M, rows,
                                   self._tiles(x_ND, plan.counts_E, M, M), M)

    def expert_forward(self, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on a few rows (R, D) -> (R, D), reading only its own weights: what
        decoding runs for each chosen expert of a single token (``engines.one_token``). Inference
        only (no autograd Function, no gradient bookkeeping)."""
        w_gate_up, w_down = expert_views(self, ("w_gate_up", "w_down"), e)
        gate, up = F.linear(x_RD, w_gate_up).chunk(2, dim=-1)                    # (R, H) each
        return F.linear(F.silu(gate).mul_(up), w_down)

    def naive_expert(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to one token, written plainly: the reference for tests."""
        gate = self.w_gate_up[e, : self.hidden] @ x_D
        up = self.w_gate_up[e, self.hidden:] @ x_D
        return self.w_down[e] @ (F.silu(gate) * up)


# module -> (which tensors, their per-expert views); see ``expert_views``
_EXPERT_VIEWS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def expert_views(module: nn.Module, names: tuple[str, ...], e) -> list[torch.Tensor]:
    """``getattr(module, name)[e]`` for each stacked (E, ...) tensor in ``names``.

    Eagerly, the per-expert views are made once and kept aside (a Python list lookup instead of
    one ``select`` op per weight and expert, which at batch-1 decode is a tenth of a MoE layer's
    ops); they are remade whenever a tensor is replaced, moved or cast, and
    ``clear_expert_views`` drops them (generation does when it ends, so no old storage outlives
    it). Under torch.compile ``e`` may be symbolic, so it indexes the tensors directly."""
    stacked = [getattr(module, name) for name in names]
    if torch.compiler.is_compiling():
        return [t[e] for t in stacked]
    key = tuple((t.data_ptr(), t.dtype, t.device) for t in stacked)
    cached = _EXPERT_VIEWS.get(module)
    if cached is None or cached[0] != key:
        cached = (key, [t.detach().unbind(0) for t in stacked])
        _EXPERT_VIEWS[module] = cached
    return [per_expert[e] for per_expert in cached[1]]


def clear_expert_views(model: nn.Module) -> None:
    for m in model.modules():
        _EXPERT_VIEWS.pop(m, None)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, run the experts in the autocast dtype (custom Functions are not autocast
    themselves)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x

