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
  output. The function saves what a dense SwiGLU's autograd saves, the (M, 2H) gate/up
  pre-activation and the (M, H) silu(gate), and the indices; in the backward it re-gathers rows
  from ``x`` and gets the routing-weight gradient as <dL/d(h w), h> instead of saving the expert
  output. (ScatterMoE, Tan et al. 2024, likewise avoids materialising the gathered copy of the
  input.) Keeping silu(gate) rather than recomputing it saves the costliest elementwise pass of
  the backward (an exp per element) for (M, H) floats of memory.

Three GEMM engines run the per-expert products:
- "grouped_mm" backend: ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm`` on torch
  2.9), one kernel per GEMM with the per-expert offsets kept on the device, so the dropless path
  never synchronises with the host. The default on CUDA. torch's fused kernel takes bf16 on
  compute capability 9.0+ (H100); other dtypes and older GPUs go through torch's own fallback, a
  per-group loop that reads the offsets back to the host (pytorch/pytorch#161407, #162059), so
  train on CUDA under bf16 autocast (the trainer's default there).
- "loop" backend, plain: one ``torch.mm`` per non-empty expert writing into a slice of a
  preallocated buffer (a loop over experts, never over tokens), over tiles of consecutive experts
  so that gathered rows and elementwise temporaries stay tile-sized (cache-friendly, low peak
  memory). On CPU it beats the CPU grouped_mm kernel, which also loops over experts.
- "loop" backend, padded: when padding every expert to the busiest one's rows wastes little
  (``padded_layout``), each GEMM of a tile is one ``bmm``. Fewer, larger ops matter with several
  threads, where every op ends in a barrier (see ``GroupedExperts.padding``).
The loop backend is the CPU default and the fallback wherever grouped_mm is missing or the
shapes break its 16-byte stride rule.
``naive_expert`` is the per-token reference the tests compare every engine against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

try:  # expert parallelism hands the experts DTensor weights; builds without distributed have none
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    class DTensor:  # type: ignore[no-redef]
        pass

if TYPE_CHECKING:
    from moelab.model.moe.dispatch import DispatchPlan

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _GROUPED_MM is not None
BACKENDS = ("auto", "grouped_mm", "loop")
# Rows per tile of the loop engine: a tile is a run of whole experts, so one busy expert can be
# larger. 2048 rows of D=512 fp32 is 4 MiB, and fewer, larger elementwise ops amortise the Python
# overhead of fine-grained experts (measured: benchmarks/moe_layer.py).
TILE_ROWS = 2048
# The padded engine (see ``padded_dispatch``): used when padding every expert to the busiest
# one's row count costs at most this factor in rows, with tiles of about PAD_TILE_ROWS slots.
PAD_MAX_WASTE = 1.25
# Padded tiles hold about this many elements of (R, D + 2H) per buffer kind (24 MiB fp32): larger
# tiles mean fewer ops, smaller ones a lower peak (the budget keeps issue 8's memory target).
PAD_TILE_ELEMS = 6 * 2**20
# Without gradients, the CPU "auto" engine uses grouped_mm up to this many rows per expert (see
# ``GroupedExperts._cpu_inference_grouped``).
INFERENCE_GROUPED_MAX_ROWS_PER_EXPERT = 32


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
    holds each expert's cumulative end row on the device. Padded engine: ``experts`` (e0, e1),
    every expert with the same number of rows, so each GEMM is one ``bmm``."""

    start: int
    end: int
    segments: list[tuple[int, int, int]]
    offs: Optional[torch.Tensor] = None
    experts: Optional[tuple[int, int]] = None   # padded engine: experts [e0, e1), equal rows each


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


def padded_layout(counts: list[int], num_rows: int, row_elems: int = 1, max_waste: Optional[float] = None,
                  tile_rows: Optional[int] = None) -> Optional[tuple[int, list[Tile]]]:
    """Capacity C = the busiest expert's rows, if E * C <= max_waste * M: then every expert gets
    C row slots (the GShard/Switch capacity layout, but dropless since C is the maximum) and each
    GEMM of a tile of experts is one ``bmm``. Tiles hold whole experts and about ``tile_rows``
    slots (default: ``PAD_TILE_ELEMS`` // ``row_elems``). Returns (C, tiles) or None.

    Why: the loop engine issues one GEMM per expert, and each multithreaded op is a parallel
    region; on a CPU shared with other jobs a region can wait a whole scheduler tick for a
    descheduled worker, so 6 GEMMs x 128 experts cost far more than 6 bmm calls per tile
    (measured: benchmarks/RESULTS.md). Padding rows cost FLOPs, hence the waste bound."""
    max_waste = PAD_MAX_WASTE if max_waste is None else max_waste
    tile_rows = PAD_TILE_ELEMS // row_elems if tile_rows is None else tile_rows
    E, C = len(counts), max(counts, default=0)
    if C == 0 or E * C > max_waste * num_rows:
        return None
    per_tile = max(1, tile_rows // C)
    tiles = []
    for e0 in range(0, E, per_tile):
        e1 = min(E, e0 + per_tile)
        tiles.append(Tile(e0 * C, e1 * C, [(e, (e - e0) * C, (e - e0 + 1) * C) for e in range(e0, e1)],
                          experts=(e0, e1)))
    return C, tiles


def pad_rows(rows: "RowMap", weight_M: torch.Tensor, counts_E: torch.Tensor, capacity: int,
             token_idx_M: torch.Tensor) -> tuple["RowMap", torch.Tensor]:
    """The fused path's RowMap and combine weights moved to the padded layout: expert e's j-th
    row goes to slot e * C + j. Padding slots read token 0 with weight 0 (so they add nothing to
    outputs or weight gradients) and write to the trash row. ``weight_S`` is built with a
    differentiable ``index_copy``, so autograd routes its gradient back to ``weight_M``."""
    E, M, C = counts_E.shape[0], token_idx_M.shape[0], capacity
    device = token_idx_M.device
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_M = torch.repeat_interleave(torch.arange(E, device=device), counts_E, output_size=M)
    slot_M = expert_M * C + torch.arange(M, device=device) - starts_E[expert_M]     # (M,)
    S = E * C

    def spread(values_M: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.full((S,), fill, dtype=values_M.dtype, device=device).index_copy_(0, slot_M, values_M)

    trash = rows.num_tokens * rows.top_k if rows.slot_M is not None else rows.num_tokens
    padded = RowMap(source_M=spread(token_idx_M, 0), num_tokens=rows.num_tokens, top_k=rows.top_k,
                    slot_M=None if rows.slot_M is None else spread(rows.slot_M, trash),
                    target_M=spread(token_idx_M, rows.num_tokens))
    weight_S = weight_M.new_zeros(S).index_copy(0, slot_M, weight_M)
    return padded, weight_S


def _rows_mm(a_RX: torch.Tensor, w_EYX: torch.Tensor, tile: Tile, transpose: bool,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise products: a[s:t] @ w[e].T (transpose) or a[s:t] @ w[e], per expert. (R, Y).
    The loop engine writes into ``out`` when given; the grouped engine always allocates."""
    w = w_EYX.transpose(1, 2) if transpose else w_EYX
    if tile.offs is not None:
        return _GROUPED_MM(a_RX, w, offs=tile.offs)
    if out is None:
        out = a_RX.new_empty(a_RX.shape[0], w.shape[2])
    if tile.experts is not None:
        e0, e1 = tile.experts
        torch.bmm(a_RX.view(e1 - e0, -1, a_RX.shape[1]), w[e0:e1], out=out.view(e1 - e0, -1, w.shape[2]))
        return out
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
    if tile.experts is not None:
        e0, e1 = tile.experts
        torch.bmm(a_RY.view(e1 - e0, -1, a_RY.shape[1]).transpose(1, 2),
                  b_RX.view(e1 - e0, -1, b_RX.shape[1]), out=out_EYX[e0:e1])
        return out_EYX
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


# When the loop engine runs expert groups side by side (``thread_groups``): only for fine-grained
# layers, where per-expert GEMMs are too small to split well across threads, and only with enough
# work (rows x D x H multiply-adds) to pay for switching thread counts. Measured, fwd+bwd, 2 threads,
# idle 2-core CPU: E=64/K=8/H=256, 4096 tokens at D=512: 446 -> 376 ms; but E=8/K=2 (any size) and
# E=64 at 2048 tokens x D=256 got slower (51 -> 68 ms, 76 -> 81 ms).
PARALLEL_MIN_EXPERTS = 32
PARALLEL_MIN_WORK = 2**31


def thread_groups(tiles: list[Tile], x: torch.Tensor, hidden: int) -> list[list[Tile]]:
    """Split the loop engine's tiles into one group per intra-op thread, balanced by rows.

    Why: a fine-grained expert's GEMM is small, and splitting each one across the intra-op
    threads ends every op in a barrier; running whole experts side by side, one thread each,
    keeps every core busy on its own GEMMs (measured in benchmarks/moe_layer.py). Tiles hold
    whole experts, so groups write disjoint weight-gradient slices; only the token accumulators
    are shared, and each group gets its own."""
    threads = torch.get_num_threads()
    # autocast state is thread-local too: under CPU autocast, stay on the calling thread
    if (threads < 2 or x.device.type != "cpu" or len(tiles) < 2 or tiles[0].offs is not None
            or torch.is_autocast_enabled("cpu")):
        return [tiles]
    experts = sum(len(t.segments) for t in tiles)
    if experts < PARALLEL_MIN_EXPERTS or tiles[-1].end * x.shape[-1] * hidden < PARALLEL_MIN_WORK:
        return [tiles]
    groups: list[list[Tile]] = [[] for _ in range(min(threads, len(tiles)))]
    loads = [0] * len(groups)
    for tile in sorted(tiles, key=lambda t: t.start - t.end):         # largest first
        g = loads.index(min(loads))
        groups[g].append(tile)
        loads[g] += tile.end - tile.start
    return [sorted(g, key=lambda t: t.start) for g in groups]


def run_groups(fn, groups: list[list[Tile]]) -> list:
    """``fn(group)`` for every group: inline for one, else each on its own single-threaded worker
    (torch releases the GIL inside its kernels). The caller's thread count is restored."""
    if len(groups) == 1:
        return [fn(groups[0])]
    threads = torch.get_num_threads()
    grad_mode = torch.is_grad_enabled()            # thread-local: a new thread starts with it on

    def work(group):
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):
            return fn(group)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            return list(pool.map(work, groups))
    finally:
        torch.set_num_threads(threads)


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Fixed-order sum of the groups' accumulators, so results do not depend on scheduling."""
    total = parts[0]
    for part in parts[1:]:
        total.add_(part)
    return total


# --------------------------------------------------------------------------------------------
# Gather and combine: where the sorted rows come from and where their outputs go
# --------------------------------------------------------------------------------------------

@dataclass
class RowMap:
    """Links the M sorted rows to the caller's tensors.

    ``source_M`` None: the input already is the (M, D) sorted rows and the output is (M, D)
    (the unfused ``permute -> experts -> unpermute`` path, where expert parallelism will put its
    all-to-all). Otherwise row m reads token ``source_M[m]`` of the (N, D) input and its output,
    scaled by the row's combine weight, is added back to that token. ``slot_M`` (the flat n*K + k assignment of each
    row) selects the deterministic combine: rows are written to their own (N*K, D) slot and summed
    over K in a fixed order, instead of an accumulating scatter, whose order of additions may
    vary from run to run on CUDA.
    """

    source_M: Optional[torch.Tensor] = None
    num_tokens: int = 0
    slot_M: Optional[torch.Tensor] = None
    top_k: int = 1
    # padded engine: where each row's output goes (padding rows -> one extra "trash" row that
    # ``finish`` drops); None = back to ``source_M``
    target_M: Optional[torch.Tensor] = None

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
        return like.new_zeros(rows + (self.target_M is not None), like.shape[1])

    def scatter(self, acc: torch.Tensor, y_RD: torch.Tensor, tile: Tile) -> None:
        if self.source_M is None:
            acc[tile.start:tile.end].copy_(y_RD)
        elif self.slot_M is not None:
            acc.index_copy_(0, self.slot_M[tile.start:tile.end], y_RD)
        else:
            # index_add_, not the accumulating index_put_: on CPU the latter is one serial pass
            # that took 15x longer (2.9 vs 0.19 ms for 4096 rows of 256 into 2048 tokens, torch
            # 2.13, 2 threads; 16 vs 0.37 ms with both cores busy elsewhere)
            target = self.source_M if self.target_M is None else self.target_M
            acc.index_add_(0, target[tile.start:tile.end], y_RD)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.target_M is not None:
            acc = acc[:-1]                                                    # the trash row
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


class _GroupedSwiGLU(torch.autograd.Function):
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
                    gate_up = grouped_gate_up = _rows_mm(x_RD, w_gate_up, tile, transpose=True)
                else:
                    gate_up = _rows_mm(x_RD, w_gate_up, tile, transpose=True,
                                       out=gate_up_M2H[tile.start:tile.end])  # (R, 2H)
                del x_RD
                # the combine weight is applied before the (linear) down projection: one (R, H)
                # multiply instead of an (R, D) one
                w_R = None if weight_M is None else weight_M[tile.start:tile.end]
                h_RH = swiglu_forward(gate_up, w_R, silu_MH[tile.start:tile.end])
                rows.scatter(acc, _rows_mm(h_RH, w_down, tile, transpose=True), tile)  # (R, D)
            return acc, grouped_gate_up

        groups = thread_groups(tiles, x, H) if rows.source_M is not None else [tiles]
        results = run_groups(run, groups)
        acc = _sum_in_order([a for a, _ in results])
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
        grad_w_gate_up = _weight_grad_buffer(w_gate_up, tiles)
        grad_w_down = _weight_grad_buffer(w_down, tiles)
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
                dh_RH = _rows_mm(dy_RD, w_down, tile, transpose=False)           # dL/d(h w)
                w_R = None if weight_M is None else weight_M[tile.start:tile.end]
                h_RH, dgate_up, grad_w_R = swiglu_backward(gate_up_M2H[tile.start:tile.end],
                                                           silu_MH[tile.start:tile.end], dh_RH, w_R)
                if grad_w_R is not None:
                    grad_weight[tile.start:tile.end] = grad_w_R
                gw_down = _weights_mm(dy_RD, h_RH, tile, gw_down)                 # (E, D, H)
                del h_RH, dy_RD, dh_RH                        # free before the next (R, D) buffers
                gw_gate_up = _weights_mm(dgate_up, rows.gather(x, tile), tile, gw_gate_up)  # (E, 2H, D)
                if grad_x is not None:
                    rows.scatter(grad_x, _rows_mm(dgate_up, w_gate_up, tile, transpose=False), tile)
            return grad_x, gw_gate_up, gw_down

        groups = thread_groups(tiles, x, H) if rows.source_M is not None else [tiles]
        results = run_groups(run, groups)
        grad_x = None if results[0][0] is None else _sum_in_order([r[0] for r in results])
        if len(groups) == 1:       # the grouped engine returns fresh weight gradients
            grad_w_gate_up, grad_w_down = results[0][1], results[0][2]
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
    ``deterministic``: combine by fixed-order sums instead of an accumulating scatter (whose
    order of additions may vary on CUDA); None follows ``torch.use_deterministic_algorithms``.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto",
                 deterministic: Optional[bool] = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GroupedExperts.backend = {backend!r} is invalid: must be one of {BACKENDS}")
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.backend = backend
        self.deterministic = deterministic
        # loop backend: use the padded (bmm) layout when it is cheap (``padded_layout``)? It pays
        # only where every multithreaded op waits on preempted threads (an oversubscribed box:
        # 5.4x -> 2.7x dense at E=64, K=8, 2 threads under load); on an idle 2-core machine the
        # unpadded loop is faster (1.52x vs 1.81x dense at E=64, K=8; 1.95x vs 2.32x at E=128,
        # K=16, 2 threads), so it is opt-in. None = off.
        self.padding: Optional[bool] = None
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def resolved_backend(self, x: torch.Tensor, num_rows: Optional[int] = None) -> str:
        """The engine that will run: the requested one, unless grouped_mm cannot take this
        dtype/shape (then the loop). "auto" on CPU also picks grouped_mm for a forward without
        gradients over ``num_rows`` rows when ``_cpu_inference_grouped`` says it is faster."""
        backend = default_backend(x.device) if self.backend == "auto" else self.backend
        if (self.backend == "auto" and backend == "loop" and num_rows is not None
                and self._cpu_inference_grouped(num_rows)):
            backend = "grouped_mm"
        if backend == "grouped_mm" and not grouped_mm_supports(x.dtype, self.d_model, self.hidden):
            return "loop"
        return backend

    def _cpu_inference_grouped(self, num_rows: int) -> bool:
        """grouped_mm loops over experts in C++, the loop engine in Python. Without gradients
        (inference, evaluation, decoding) and with a few rows per expert, where each expert's GEMM
        is mostly reading its weights, that per-expert Python cost shows: measured forward-only,
        2 threads, D=512: 0.81-0.94x the loop's time for E <= rows <= 32 E (E=64 and 128, 4 to 256
        tokens), but 1.2-1.4x at 128 rows per expert and 1.1-1.2x for a single token (K of E
        experts busy, grouped_mm still visits all E). With gradients the loop stays (its backward
        is the faster one)."""
        E = self.num_experts
        return (HAS_GROUPED_MM and not torch.is_grad_enabled()
                and E <= num_rows <= INFERENCE_GROUPED_MAX_ROWS_PER_EXPERT * E)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if isinstance(w_gate_up, DTensor):
            # expert parallelism (moelab.parallel): this rank's experts, a differentiable view
            w_gate_up, w_down = w_gate_up.to_local(), w_down.to_local()
        # ``.to`` is a no-op at the parameters' dtype and differentiable otherwise (bf16 compute
        # over fp32 master weights)
        return w_gate_up.to(dtype), w_down.to(dtype)

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
        weight_M = plan.weight_M
        if self.resolved_backend(x_ND, M) == "grouped_mm":
            tiles = grouped_tiles(plan.counts_E, M)
        else:
            counts = plan.counts_E.tolist()
            padding = bool(self.padding)
            padded = padded_layout(counts, M, self.d_model + 2 * self.hidden) if padding else None
            if padded is None:
                tiles = loop_tiles(plan.counts_E)
            else:
                C, tiles = padded
                rows, weight_M = pad_rows(rows, weight_M, plan.counts_E, C, plan.token_idx_M)
                M = tiles[-1].end
        return _GroupedSwiGLU.apply(x_ND, w_gate_up, w_down, weight_M, rows, tiles, M)

    def expert_forward(self, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on a few rows (R, D) -> (R, D), reading only its own weights: what
        decoding runs for each chosen expert of a single token (``moelab.generate``). Inference
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
