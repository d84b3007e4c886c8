"""How the expert-sorted rows are cut into GEMM segments, and, on a CPU, which thread runs which.

Legend: M rows (expert-sorted assignments), E experts, D width, H expert hidden.

Why tiles: the loop engine runs one GEMM per expert on a contiguous slice of the sorted rows.
Processing a run of whole experts at a time keeps the gathered rows and the elementwise
temporaries tile-sized (cache-friendly, a low peak), and lets several tiles run side by side on
single-threaded workers where per-expert GEMMs are too small to split well across threads.
Figures behind the constants: benchmarks/RESULTS.md ("Expert engines").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch

# Rows per tile of the loop engine (a tile holds whole experts, so one busy expert can be larger):
# 2048 rows of D=512 fp32 is 4 MiB, and fewer, larger elementwise ops amortise the Python
# overhead of fine-grained experts.
TILE_ROWS = 2048
# Tiles run side by side on single-threaded workers (``thread_groups``) only for fine-grained
# layers with enough work (rows x D x H multiply-adds) to pay for switching thread counts.
PARALLEL_MIN_EXPERTS = 32
PARALLEL_MIN_WORK = 2**31


@dataclass
class Tile:
    """Rows [start, end) of the expert-sorted rows, processed together.

    Loop engine: ``segments`` lists (expert, s, t) with rows [s, t) relative to ``start``, only
    for experts that received rows. Grouped engine: one tile over all rows, and ``offs`` (E,)
    int32 holds each expert's cumulative end row on the device."""

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


def thread_groups(tiles: list[Tile], x: torch.Tensor, hidden: int) -> list[list[Tile]]:
    """Split the loop engine's tiles into one group per intra-op thread, balanced by rows.

    Why: a fine-grained expert's GEMM is small, and splitting each one across the intra-op
    threads ends every op in a barrier; running whole experts side by side, one thread each,
    keeps every core busy on its own GEMMs. Tiles hold whole experts, so groups write disjoint
    weight-gradient slices; only the token accumulators are shared, and each group gets its own."""
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


T = TypeVar("T")


def run_groups(fn: Callable[[list[Tile]], T], groups: list[list[Tile]]) -> list[T]:
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


def sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Fixed-order sum of the groups' accumulators, so results do not depend on scheduling."""
    total = parts[0]
    for part in parts[1:]:
        total.add_(part)
    return total
