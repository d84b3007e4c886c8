"""Gradient-norm clipping for one process, at the cost of one read of the gradients when no
clipping is needed.

``torch.nn.utils.clip_grad_norm_`` always multiplies every gradient by its clip factor (1.0
when the norm is under the limit), so that it never has to read the norm back to the host: right
for an asynchronous GPU, but a second full pass over the gradients on a CPU. The trainer reads
the norm back anyway (it logs it and stops on a non-finite one), so here the multiply runs only
when the norm is over the limit: in ``moelab compare``'s default runs, about 40% of steps. The
squared norms come from ``torch.dot`` (a BLAS reduction), which measured 1.5x faster than
``torch.linalg.vector_norm`` on CPU over the same gradients (benchmarks/RESULTS.md). The result
is the same clipping rule, max_norm / (norm + 1e-6) when below 1, as torch's.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all ``grads`` as a 0-d tensor (inf or nan when any gradient is). On CPU, a
    BLAS dot per tensor (float64 sums of the per-tensor squares); elsewhere torch's fused
    per-device norm (one kernel for all tensors instead of one per tensor)."""
    if not grads:
        return torch.zeros(())
    if grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads, 2.0)
    squares = []
    for g in grads:
        flat = g.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):   # BLAS dot: fp32/fp64 only
            flat = flat.float()
        squares.append(torch.dot(flat, flat).double())
    return torch.stack(squares).sum().sqrt()


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients in place to global L2 norm ``max_norm``; returns the norm before
    clipping, as a float. Non-finite norms are returned untouched (the trainer reports them)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = float(total_grad_norm(grads))
    if math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm
