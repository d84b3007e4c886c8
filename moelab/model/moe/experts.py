"""Routed experts stored as stacked (E, ·, ·) weights and run as grouped GEMMs.

Legend: N tokens, M rows (expert-sorted assignments), R rows of one tile, D width, H expert
hidden, E experts, K experts per token.

Weights use the (out, in) layout of ``nn.Linear`` and Hugging Face's fused experts:
``w_gate_up`` (E, 2H, D) with the gate rows first, ``w_down`` (E, D, H).

Every expert computes ``down(silu(gate(x)) * up(x))`` on its contiguous slice of the sorted rows.
The whole block (gather -> gate_up GEMM -> SwiGLU -> down GEMM -> weighted scatter-add) is one
``torch.autograd.Function`` with a hand-written backward, because plain autograd is both slow and
memory-hungry here:
- indexing ``w[e]`` per expert makes autograd build one full (E, ·, ·) zero gradient per expert;
- autograd would save the gathered (M, D) rows, the (M, H) activation and the (M, D) expert
  output. The function saves only the (M, 2H) gate/up pre-activation (as a dense SwiGLU does) and
  the indices; in the backward it re-gathers rows from ``x``, recomputes silu, and gets the
  routing-weight gradient as <dL/d(h w), h> instead of saving the expert output (the same
  recompute-over-store trade as MegaBlocks' and ScatterMoE's fused expert kernels).

Two GEMM engines run the per-expert products:
- "grouped_mm": ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm`` on torch 2.9), one
  kernel per GEMM with the per-expert offsets kept on the device, so the dropless path never
  synchronises with the host. The default on CUDA.
- "loop": one ``torch.mm`` per non-empty expert writing into a slice of a preallocated buffer (a
  loop over experts, never over tokens). On CPU it beats the CPU grouped_mm kernel (measured in
  benchmarks/RESULTS.md), and it processes the rows in tiles of consecutive experts, so gathered
  rows and elementwise temporaries stay tile-sized (cache-friendly, low peak memory). The default
  on CPU and the fallback wherever grouped_mm is missing or the shapes break its 16-byte stride
  rule.
``naive_expert`` is the per-token reference the tests compare both against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from moelab.model.moe.dispatch import DispatchPlan

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _GROUPED_MM is not None
BACKENDS = ("auto", "grouped_mm", "loop")
# Rows per tile of the loop engine: a tile is a run of whole experts, so one busy expert can be
# larger. 2048 rows of D=512 fp32 is 4 MiB, and fewer, larger elementwise ops amortise the Python
# overhead of fine-grained experts (measured: benchmarks/moe_layer.py).
TILE_ROWS = 2048


def default_backend(device: torch.device) -> str:
    return "grouped_mm" if HAS_GROUPED_MM and device.type == "cuda" else "loop"


def grouped_mm_supports(dtype: torch.dtype, d_model: int, hidden: int) -> bool:
    """grouped_mm takes fp32/bf16/fp16 only, and its operands' strides must be multiples of 16
    bytes, which the (M, 2H) gate/up halves and the transposed operands of the backward satisfy
    when D and H are multiples of 16 bytes' worth of elements."""
    if not HAS_GROUPED_MM or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per_16_bytes = 128 // torch.finfo(dtype).bits
    return d_model % per_16_bytes == 0 and hidden % per_16_bytes == 0


# --------------------------------------------------------------------------------------------
# Tiles: how the sorted rows are cut into GEMM segments
# --------------------------------------------------------------------------------------------

@dataclass
class Tile:
    """Rows [start, end) of the expert-sorted rows, processed together.

    Loop engine: ``segments`` lists (expert, s, t) with rows [s, t) relative to ``start``, only
    for experts that received rows. Grouped engine: one tile over all rows, ``offs`` (E,) int32
    holds each expert's cumulative end row on the device."""

    start: int
    end: int
    segments: list[tuple[int, int, int]]
    offs: Optional[torch.Tensor] = None


def loop_tiles(counts_E: torch.Tensor, rows: Optional[int] = None) -> list[Tile]:
    """Cut the experts, in order, into runs of at most ``rows`` (default ``TILE_ROWS``) rows, or
    one expert if it alone has more, skipping empty experts. Reads the counts on the host (one
    sync; free on CPU)."""
    rows = TILE_ROWS if rows is None else rows
    tiles, segments, start, pos = [], [], 0, 0
    for e, count in enumerate(counts_E.tolist()):
        if count == 0:
            continue
        if segments and pos + count - start > rows:
            tiles.append(Tile(start, pos, segments))
            segments, start = [], pos
        segments.append((e, pos - start, pos + count - start))
        pos += count
    if segments:
        tiles.append(Tile(start, pos, segments))
    return tiles


def grouped_tiles(counts_E: torch.Tensor, num_rows: int) -> list[Tile]:
    """One tile over all rows; the offsets stay on the device (no host sync)."""
    if num_rows == 0:
        return []
    return [Tile(0, num_rows, [], torch.cumsum(counts_E, 0, dtype=torch.int32))]


def _rows_mm(a_RX: torch.Tensor, w_EYX: torch.Tensor, tile: Tile, transpose: bool,
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


def _weights_mm(a_RY: torch.Tensor, b_RX: torch.Tensor, tile: Tile,
                out_EYX: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight gradients: out[e] = a[s:t].T @ b[s:t] for the experts of the tile, (E, Y, X).

    The loop engine writes its experts into ``out_EYX`` (see ``_weight_grad_buffer``); the
    grouped engine returns a new tensor over all experts, zeroing the empty ones itself rather
    than trusting the kernel with an empty reduction."""
    if tile.offs is not None:
        out = _GROUPED_MM(a_RY.t(), b_RX, offs=tile.offs)
        counts_E = torch.diff(tile.offs, prepend=tile.offs.new_zeros(1))
        return out.masked_fill_((counts_E == 0).view(-1, 1, 1), 0.0)
    for e, s, t in tile.segments:
        torch.mm(a_RY[s:t].t(), b_RX[s:t], out=out_EYX[e])
    return out_EYX


def _weight_grad_buffer(w_EYX: torch.Tensor, tiles: list[Tile]) -> Optional[torch.Tensor]:
    """Uninitialised where the loop engine's tiles will write, zero for experts without rows.
    A full zero fill first would be a second pass over E*Y*X fresh memory, which costs as much
    as the GEMMs themselves when experts get few rows (measured: 30% of a 256-token step)."""
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
    all-to-all). Otherwise row m reads token ``source_M[m]`` of the (N, D) input, is scaled by
    ``weight_M[m]`` and added back to that token. ``slot_M`` (the flat n*K + k assignment of each
    row) selects the deterministic combine: rows are written to their own (N*K, D) slot and summed
    over K in a fixed order, instead of ``index_add_``, whose CUDA atomics add in a random order.
    """

    source_M: Optional[torch.Tensor] = None
    weight_M: Optional[torch.Tensor] = None
    num_tokens: int = 0
    slot_M: Optional[torch.Tensor] = None
    top_k: int = 1

    def gather(self, x: torch.Tensor, tile: Tile) -> torch.Tensor:
        """Rows of the tile: (R, D), a copy when fused, a view otherwise."""
        if self.source_M is None:
            return x[tile.start:tile.end]
        return x.index_select(0, self.source_M[tile.start:tile.end])

    def new_output(self, like: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Zeroed accumulator: (N, D), (N*K, D) slots, or (M, D) sorted rows."""
        if self.source_M is None:
            return like.new_zeros(num_rows, like.shape[1])
        rows = self.num_tokens * self.top_k if self.slot_M is not None else self.num_tokens
        return like.new_zeros(rows, like.shape[1])

    def scatter(self, acc: torch.Tensor, y_RD: torch.Tensor, tile: Tile) -> None:
        if self.source_M is None:
            acc[tile.start:tile.end].copy_(y_RD)
        elif self.slot_M is not None:
            acc.index_copy_(0, self.slot_M[tile.start:tile.end], y_RD)
        else:
            acc.index_add_(0, self.source_M[tile.start:tile.end], y_RD)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.source_M is not None and self.slot_M is not None:
            return acc.view(self.num_tokens, self.top_k, -1).sum(dim=1)       # (N, D)
        return acc


class _GroupedSwiGLU(torch.autograd.Function):
    """y = combine(weight * down(silu(gate(x)) * up(x))) over expert-sorted rows; see the module
    docstring for what is saved and recomputed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                weight_M: Optional[torch.Tensor], rows: RowMap, tiles: list[Tile],
                num_rows: int) -> torch.Tensor:
        H = w_down.shape[2]
        grouped = bool(tiles) and tiles[0].offs is not None
        # the only activation saved for the backward (a dense SwiGLU saves as much)
        gate_up_M2H = None if grouped else x.new_empty(num_rows, 2 * H)
        acc = rows.new_output(x, num_rows)
        for tile in tiles:
            x_RD = rows.gather(x, tile)
            if grouped:
                gate_up = gate_up_M2H = _rows_mm(x_RD, w_gate_up, tile, transpose=True)
            else:
                gate_up = _rows_mm(x_RD, w_gate_up, tile, transpose=True,
                                   out=gate_up_M2H[tile.start:tile.end])      # (R, 2H)
            del x_RD
            h_RH = F.silu(gate_up[:, :H]).mul_(gate_up[:, H:])
            if weight_M is not None:
                # the combine weight is applied before the (linear) down projection: one
                # (R, H) multiply instead of an (R, D) one
                h_RH.mul_(weight_M[tile.start:tile.end, None].to(h_RH.dtype))
            rows.scatter(acc, _rows_mm(h_RH, w_down, tile, transpose=True), tile)    # (R, D)
        if gate_up_M2H is None:                                   # no rows at all
            gate_up_M2H = x.new_empty(0, 2 * H)
        ctx.save_for_backward(x, w_gate_up, w_down, weight_M, gate_up_M2H)
        ctx.rows, ctx.tiles = rows, tiles
        return rows.finish(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, w_gate_up, w_down, weight_M, gate_up_M2H = ctx.saved_tensors
        rows, tiles = ctx.rows, ctx.tiles
        H = w_down.shape[2]
        grad_out = grad_out.contiguous()
        grad_x = rows.new_output(x, gate_up_M2H.shape[0]) if ctx.needs_input_grad[0] else None
        grad_w_gate_up = _weight_grad_buffer(w_gate_up, tiles)
        grad_w_down = _weight_grad_buffer(w_down, tiles)
        grad_weight = None
        if weight_M is not None:
            grad_weight = weight_M.new_zeros(weight_M.shape)
        for tile in tiles:
            dy_RD = rows.gather(grad_out, tile)                                   # (R, D)
            gate, up = gate_up_M2H[tile.start:tile.end].chunk(2, dim=-1)          # (R, H) each
            silu_RH = F.silu(gate)
            h_RH = silu_RH * up
            dh_RH = _rows_mm(dy_RD, w_down, tile, transpose=False)               # dL/d(h w)
            if weight_M is not None:
                w_R1 = weight_M[tile.start:tile.end, None].to(h_RH.dtype)
                grad_weight[tile.start:tile.end] = (dh_RH * h_RH).sum(-1, dtype=grad_weight.dtype)
                h_RH.mul_(w_R1)
                dh_RH.mul_(w_R1)
            grad_w_down = _weights_mm(dy_RD, h_RH, tile, grad_w_down)             # (E, D, H)
            del h_RH
            dgate_up = torch.empty_like(gate_up_M2H[tile.start:tile.end])         # (R, 2H)
            torch.ops.aten.silu_backward(dh_RH * up, gate, grad_input=dgate_up[:, :H])
            torch.mul(dh_RH, silu_RH, out=dgate_up[:, H:])
            del dh_RH, silu_RH
            grad_w_gate_up = _weights_mm(dgate_up, rows.gather(x, tile), tile,
                                         grad_w_gate_up)                          # (E, 2H, D)
            if grad_x is not None:
                rows.scatter(grad_x, _rows_mm(dgate_up, w_gate_up, tile, transpose=False), tile)
        if not tiles:                                     # no rows: zero gradients
            grad_w_gate_up, grad_w_down = torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
        if grad_x is not None:
            grad_x = rows.finish(grad_x)
        return grad_x, grad_w_gate_up, grad_w_down, grad_weight, None, None, None


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------

class GroupedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights.

    ``backend``: "auto" (grouped_mm on CUDA, loop on CPU), "grouped_mm" or "loop".
    ``deterministic``: combine by fixed-order sums instead of ``index_add_`` (whose CUDA atomics
    make the sum order vary run to run); None follows ``torch.use_deterministic_algorithms``.
    """

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

    def resolved_backend(self, x: torch.Tensor) -> str:
        """The engine that will run: the requested one, unless grouped_mm cannot take this
        dtype/shape (then the loop)."""
        backend = default_backend(x.device) if self.backend == "auto" else self.backend
        if backend == "grouped_mm" and not grouped_mm_supports(x.dtype, self.d_model, self.hidden):
            return "loop"
        return backend

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # ``.to`` is a no-op at the parameters' dtype and differentiable otherwise (bf16 compute
        # over fp32 master weights)
        return self.w_gate_up.to(dtype), self.w_down.to(dtype)

    def _tiles(self, x: torch.Tensor, counts_E: torch.Tensor, num_rows: int) -> list[Tile]:
        if self.resolved_backend(x) == "grouped_mm":
            return grouped_tiles(counts_E, num_rows)
        return loop_tiles(counts_E)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows in, expert outputs out, (M, D) -> (M, D); ``counts_E`` rows per
        expert. The unfused form: ``permute``, then this, then ``unpermute``."""
        x_MD = _compute_dtype(x_MD)
        w_gate_up, w_down = self._weights(x_MD.dtype)
        M = x_MD.shape[0]
        return _GroupedSwiGLU.apply(x_MD, w_gate_up, w_down, None, RowMap(),
                                    self._tiles(x_MD, counts_E, M), M)

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
        return _GroupedSwiGLU.apply(x_ND, w_gate_up, w_down, plan.weight_M, rows,
                                    self._tiles(x_ND, plan.counts_E, M), M)

    def naive_expert(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to one token, written plainly: the reference for tests."""
        gate = self.w_gate_up[e, : self.hidden] @ x_D
        up = self.w_gate_up[e, self.hidden:] @ x_D
        return self.w_down[e] @ (F.silu(gate) * up)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, run the experts in the autocast dtype (custom Functions are not autocast
    themselves)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x
