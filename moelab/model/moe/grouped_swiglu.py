"""The routed experts' SwiGLU as one autograd Function over expert-sorted rows: gather ->
gate_up GEMM -> SwiGLU -> down GEMM -> weighted scatter-add, with a hand-written backward.

Legend: N tokens, M rows (expert-sorted assignments), R rows of one tile, D width, H expert
hidden, E experts, K experts per token.

Why a Function and not plain autograd: indexing ``w[e]`` per expert makes autograd build one full
(E, ., .) zero gradient per expert, and autograd would save the gathered (M, D) rows, the (M, H)
activation and the (M, D) expert output. This Function saves what a dense SwiGLU's autograd
saves, the (M, 2H) gate/up pre-activation and the (M, H) silu(gate), plus the indices; the
backward re-gathers rows from ``x`` and gets the routing-weight gradient as <dL/d(h w), h>
instead of saving the expert output (ScatterMoE, Tan et al. 2024, likewise never materialises
the gathered input). Keeping silu(gate) saves the costliest elementwise pass of the backward (an
exp per element) for (M, H) floats of memory.

The per-expert products run on either engine (see ``moelab.model.moe.engines``): one
``grouped_mm`` per GEMM with device offsets, or one ``torch.mm`` per non-empty expert over tiles
of whole experts (``moelab.model.moe.tiles``), writing into preallocated buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moelab.model.moe.tiles import Tile, run_groups, sum_in_order, thread_groups

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _GROUPED_MM is not None


# --------------------------------------------------------------------------------------------
# Per-expert products
# --------------------------------------------------------------------------------------------

def rows_mm(a_RX: torch.Tensor, w_EYX: torch.Tensor, tile: Tile, transpose: bool,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise products: a[s:t] @ w[e].T (transpose) or a[s:t] @ w[e], per expert. (R, Y).
    The loop engine writes into ``out`` when given; the grouped engine always allocates."""
    w = w_EYX.transpose(1, 2) if transpose else w_EYX
    if tile.offs is not None:
        return _GROUPED_MM(a_RX, w, offs=tile.offs)
    if out is None:
        out = a_RX.new_empty(a_RX.shape[0], w.shape[2])
    for e, s, t in tile.segments:
        torch.mm(a_RX[s:t], w[e], out=out[s:t])
    return out


def weights_mm(a_RY: torch.Tensor, b_RX: torch.Tensor, tile: Tile,
               out_EYX: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight gradients: out[e] = a[s:t].T @ b[s:t] for the experts of the tile, (E, Y, X).

    The loop engine writes its experts into ``out_EYX`` (see ``weight_grad_buffer``); the
    grouped engine returns a new tensor over all experts, zeroing the empty ones itself rather
    than trusting the kernel with an empty reduction."""
    if tile.offs is not None:
        out = _GROUPED_MM(a_RY.t(), b_RX, offs=tile.offs)
        counts_E = torch.diff(tile.offs, prepend=tile.offs.new_zeros(1))
        return out.masked_fill_((counts_E == 0).view(-1, 1, 1), 0.0)
    for e, s, t in tile.segments:
        torch.mm(a_RY[s:t].t(), b_RX[s:t], out=out_EYX[e])
    return out_EYX


def weight_grad_buffer(w_EYX: torch.Tensor, tiles: list[Tile]) -> Optional[torch.Tensor]:
    """Uninitialised where the loop engine's tiles will write, zero for experts without rows.
    A full zero fill first would be a second pass over E*Y*X fresh memory, which costs as much
    as the GEMMs themselves when experts get few rows (benchmarks/RESULTS.md, "Expert engines")."""
    if tiles and tiles[0].offs is not None:
        return None                                       # grouped engine allocates
    grad = torch.empty_like(w_EYX)
    present = {e for tile in tiles for e, _, _ in tile.segments}
    absent = [e for e in range(w_EYX.shape[0]) if e not in present]
    if absent:
        grad.index_fill_(0, torch.tensor(absent, device=grad.device), 0.0)
    return grad


# --------------------------------------------------------------------------------------------
# Gather and combine: where the sorted rows come from and where their outputs go
# --------------------------------------------------------------------------------------------

@dataclass
class RowMap:
    """Links the M sorted rows to the caller's tensors.

    ``source_M`` None: the input already is the (M, D) sorted rows and the output is (M, D)
    (the unfused ``permute -> experts -> unpermute`` path, where expert parallelism will put its
    all-to-all). Otherwise row m reads token ``source_M[m]`` of the (N, D) input and its output,
    scaled by the row's combine weight, is added back to that token. ``slot_M`` (the flat
    n*K + k assignment of each row) selects the deterministic combine: rows are written to their own (N*K, D) slot and summed
    over K in a fixed order, instead of an accumulating scatter, whose order of additions may
    vary from run to run on CUDA.
    """

    source_M: Optional[torch.Tensor] = None
    num_tokens: int = 0
    slot_M: Optional[torch.Tensor] = None
    top_k: int = 1

    def gather(self, x: torch.Tensor, tile: Tile) -> torch.Tensor:
        """Rows of the tile: (R, D), a copy when fused, a view otherwise."""
        if self.source_M is None:
            return x[tile.start:tile.end]
        return x.index_select(0, self.source_M[tile.start:tile.end])

    def new_output(self, like: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Accumulator: zeroed (N, D) or (N*K, D) slots (tokens or slots may get no row), or
        (M, D) sorted rows, each of which a tile writes."""
        if self.source_M is None:
            return like.new_empty(num_rows, like.shape[1])
        rows = self.num_tokens * self.top_k if self.slot_M is not None else self.num_tokens
        return like.new_zeros(rows, like.shape[1])

    def scatter(self, acc: torch.Tensor, y_RD: torch.Tensor, tile: Tile) -> None:
        if self.source_M is None:
            acc[tile.start:tile.end].copy_(y_RD)
        elif self.slot_M is not None:
            acc.index_copy_(0, self.slot_M[tile.start:tile.end], y_RD)
        else:
            # index_add_, not the accumulating index_put_, which is one serial pass on CPU
            # (15x slower, benchmarks/RESULTS.md "Expert engines")
            acc.index_add_(0, self.source_M[tile.start:tile.end], y_RD)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.source_M is not None and self.slot_M is not None:
            return acc.view(self.num_tokens, self.top_k, -1).sum(dim=1)       # (N, D)
        return acc


def swiglu_forward(gate_up_R2H: torch.Tensor, weight_R: Optional[torch.Tensor],
                   silu_RH: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [* weight]: (R, H). silu(gate) is written into ``silu_RH``, where the
    backward reads it."""
    H = gate_up_R2H.shape[1] // 2
    h_RH = torch.ops.aten.silu.out(gate_up_R2H[:, :H], out=silu_RH) * gate_up_R2H[:, H:]
    if weight_R is not None:
        h_RH.mul_(weight_R[:, None].to(h_RH.dtype))
    return h_RH


def swiglu_backward(gate_up_R2H: torch.Tensor, silu_RH: torch.Tensor, dh_RH: torch.Tensor,
                    weight_R: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The SwiGLU's elementwise backward, given dL/d(h w) from the down projection and the
    forward's silu(gate).

    Returns (h * w, the down projection's input; dL/d(gate | up), (R, 2H); dL/dw, (R,) float32 or
    None). ``dh_RH`` is overwritten; ``silu_RH`` is not."""
    H = gate_up_R2H.shape[1] // 2
    gate, up = gate_up_R2H[:, :H], gate_up_R2H[:, H:]
    h_RH = silu_RH * up
    grad_w_R = None
    if weight_R is not None:
        w_R1 = weight_R[:, None].to(h_RH.dtype)
        grad_w_R = (torch.linalg.vecdot(dh_RH, h_RH) if h_RH.dtype == weight_R.dtype
                    else (dh_RH * h_RH).sum(-1, dtype=weight_R.dtype))
        h_RH.mul_(w_R1)
        dh_RH.mul_(w_R1)
    dgate_up = torch.empty_like(gate_up_R2H)                                  # (R, 2H)
    torch.mul(dh_RH, silu_RH, out=dgate_up[:, H:])
    dh_RH.mul_(up)                                              # dL/dsilu, in dL/dh's buffer
    torch.ops.aten.silu_backward(dh_RH, gate, grad_input=dgate_up[:, :H])
    return h_RH, dgate_up, grad_w_R


class GroupedSwiGLU(torch.autograd.Function):
    """y = combine(weight * down(silu(gate(x)) * up(x))) over expert-sorted rows; see the module
    docstring for what is saved and recomputed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                weight_M: Optional[torch.Tensor], rows: RowMap, tiles: list[Tile],
                num_rows: int) -> torch.Tensor:
        H = w_down.shape[2]
        grouped = bool(tiles) and tiles[0].offs is not None
        # the activations saved for the backward (a dense SwiGLU's autograd saves as much)
        gate_up_M2H = None if grouped else x.new_empty(num_rows, 2 * H)
        silu_MH = x.new_empty(num_rows, H)

        def run(group: list[Tile]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            acc, grouped_gate_up = rows.new_output(x, num_rows), None
            for tile in group:
                x_RD = rows.gather(x, tile)
                if grouped:
                    gate_up = grouped_gate_up = rows_mm(x_RD, w_gate_up, tile, transpose=True)
                else:
                    gate_up = rows_mm(x_RD, w_gate_up, tile, transpose=True,
                                      out=gate_up_M2H[tile.start:tile.end])  # (R, 2H)
                del x_RD
                # the combine weight is applied before the (linear) down projection: one (R, H)
                # multiply instead of an (R, D) one
                w_R = None if weight_M is None else weight_M[tile.start:tile.end]
                h_RH = swiglu_forward(gate_up, w_R, silu_MH[tile.start:tile.end])
                rows.scatter(acc, rows_mm(h_RH, w_down, tile, transpose=True), tile)  # (R, D)
            return acc, grouped_gate_up

        groups = thread_groups(tiles, x, H) if rows.source_M is not None else [tiles]
        results = run_groups(run, groups)
        acc = sum_in_order([a for a, _ in results])
        if grouped:
            gate_up_M2H = results[0][1]
        if gate_up_M2H is None:                                   # no rows at all
            gate_up_M2H = x.new_empty(0, 2 * H)
        ctx.save_for_backward(x, w_gate_up, w_down, weight_M, gate_up_M2H, silu_MH)
        ctx.rows, ctx.tiles = rows, tiles
        return rows.finish(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, w_gate_up, w_down, weight_M, gate_up_M2H, silu_MH = ctx.saved_tensors
        rows, tiles = ctx.rows, ctx.tiles
        H = w_down.shape[2]
        grad_out = grad_out.contiguous()
        grad_w_gate_up = weight_grad_buffer(w_gate_up, tiles)
        grad_w_down = weight_grad_buffer(w_down, tiles)
        grad_weight = None
        if weight_M is not None:
            grad_weight = weight_M.new_zeros(weight_M.shape)

        def run(group: list[Tile]) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
            # tiles hold whole experts: the weight-gradient slices and grad_weight rows a group
            # writes are its own; grad_x is per group and summed afterwards
            gw_gate_up, gw_down = grad_w_gate_up, grad_w_down
            grad_x = rows.new_output(x, gate_up_M2H.shape[0]) if ctx.needs_input_grad[0] else None
            for tile in group:
                dy_RD = rows.gather(grad_out, tile)                               # (R, D)
                dh_RH = rows_mm(dy_RD, w_down, tile, transpose=False)            # dL/d(h w)
                w_R = None if weight_M is None else weight_M[tile.start:tile.end]
                h_RH, dgate_up, grad_w_R = swiglu_backward(gate_up_M2H[tile.start:tile.end],
                                                           silu_MH[tile.start:tile.end], dh_RH, w_R)
                if grad_w_R is not None:
                    grad_weight[tile.start:tile.end] = grad_w_R
                gw_down = weights_mm(dy_RD, h_RH, tile, gw_down)                 # (E, D, H)
                del h_RH, dy_RD, dh_RH                        # free before the next (R, D) buffers
                gw_gate_up = weights_mm(dgate_up, rows.gather(x, tile), tile, gw_gate_up)  # (E, 2H, D)
                if grad_x is not None:
                    rows.scatter(grad_x, rows_mm(dgate_up, w_gate_up, tile, transpose=False), tile)
            return grad_x, gw_gate_up, gw_down

        groups = thread_groups(tiles, x, H) if rows.source_M is not None else [tiles]
        results = run_groups(run, groups)
        grad_x = None if results[0][0] is None else sum_in_order([r[0] for r in results])
        if len(groups) == 1:       # the grouped engine returns fresh weight gradients
            grad_w_gate_up, grad_w_down = results[0][1], results[0][2]
        if not tiles:                                     # no rows: zero gradients
            grad_w_gate_up, grad_w_down = torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
        if grad_x is not None:
            grad_x = rows.finish(grad_x)
        return grad_x, grad_w_gate_up, grad_w_down, grad_weight, None, None, None

