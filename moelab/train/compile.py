"""Opt-in ``torch.compile`` for training (``train.compile = true``).

Only the dense parts of each block are compiled: the attention sublayer and the two RMSNorms
(plus the final norm). There eager PyTorch spends its time in many small elementwise passes
(RMSNorm's decomposed forward and backward, RoPE's slices, negation and concatenation) that
inductor fuses into a few loops. The MoE layer stays eager: its CPU engine reads the expert counts
on the host and runs a hand-written autograd Function, so compiling it would only cut the graph
into pieces. Measured on the ``mixtral`` preset, B=8, T=256, one CPU thread: 692 -> 639 ms of CPU
time per training step (benchmarks/RESULTS.md).

It degrades to eager, with a warning, wherever compiling fails: torch without ``torch.compile``,
no working C++ toolchain for inductor (found by compiling a tiny probe first), or a module whose
first compiled call raises. Compiled kernels round differently from eager ones, so a compiled
run's losses match an eager run's only to float tolerance.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _probe() -> None:
    """Compile and differentiate a tiny function, so a broken toolchain shows up here and not in
    the middle of the first training step's backward."""
    fn = torch.compile(lambda t: torch.nn.functional.silu(t).sum(), dynamic=False)
    x = torch.randn(4, requires_grad=True)
    fn(x).backward()


class _CompiledOrEager:
    """Calls the compiled forward; if its first call fails, warns once and runs eagerly."""

    def __init__(self, eager: Callable, name: str, warn: Callable[[str], None]):
        self.eager, self.name, self.warn = eager, name, warn
        self.compiled = torch.compile(eager, dynamic=False)
        self.working = False

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.working:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:                       # noqa: BLE001 - any compiler failure
            self.warn(f"torch.compile failed for {self.name} ({type(e).__name__}: {e}); running it eagerly")
            self.compiled = None
            return self.eager(*args, **kwargs)
        self.working = True
        return out


def compile_dense_parts(model: nn.Module, warn: Callable[[str], None] = print) -> int:
    """Compile the attention sublayers and norms of a moelab Transformer in place (their
    ``forward``; parameters and state dict are untouched). Returns how many modules were wrapped,
    0 when compiling is not available here."""
    if not hasattr(torch, "compile"):
        warn("train.compile: this torch has no torch.compile; training eagerly")
        return 0
    try:
        _probe()
    except Exception as e:                           # noqa: BLE001
        warn(f"train.compile: torch.compile does not work here ({type(e).__name__}: {e}); training eagerly")
        return 0
    targets = {"norm": model.norm}
    for i, blk in enumerate(model.blocks):
        targets.update({f"blocks.{i}.attn_norm": blk.attn_norm, f"blocks.{i}.attn": blk.attn,
                        f"blocks.{i}.ffn_norm": blk.ffn_norm})
    for name, module in targets.items():
        module.forward = _CompiledOrEager(module.forward, name, warn)
    return len(targets)
