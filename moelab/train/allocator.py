"""Keep freed CPU memory for reuse, so that a training step does not fault in fresh pages.

Why: PyTorch on CPU allocates every tensor with ``malloc``, and glibc serves large blocks (from
128 KiB up, a threshold that only creeps up as such blocks are freed) with a fresh ``mmap`` and
returns them to the kernel on ``free``. A training step allocates and frees the same multi-MiB
activations and gradients every step, so each first write to them takes one page fault per 4 KiB
page. That cost lands in whichever op touches the memory first and is largest for the MoE layer,
whose gathered rows, gate/up activations and per-expert gradients are all fresh (M, ·) buffers.
Measured on the default compare study's MoE layer (8 experts of 384, top-2, 1024 tokens, 2
threads, AMD EPYC): the experts' SwiGLU backward took 10.6 ms with glibc's defaults and 5.4 ms
with freed memory kept, and the expert GEMMs went from 58-81 to 80-128 GFLOP/s (benchmarks/RESULTS.md).

The remedy is the one PyTorch's CPU performance guides give (a caching allocator such as jemalloc
or tcmalloc, preloaded), done in-process with glibc's own knobs: serve blocks up to glibc's cap of
32 MiB from the heap, and do not trim the heap back to the kernel until 1 GiB of it is free. The
process keeps its peak footprint instead of returning it between steps, as a CUDA caching
allocator does.

A user who set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (or preloads another
allocator and sets ``MOELAB_KEEP_ALLOCATOR=1``) keeps their choice; other C libraries are left
alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1          # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CAP = 32 * 2**20  # glibc ignores larger values on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MOELAB_KEEP_ALLOCATOR")

_applied = False


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc for a training loop (see the module docstring). Idempotent; returns
    whether the tuning is in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version                   # glibc only: musl has no such knobs
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAP) == 1
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied
