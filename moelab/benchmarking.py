"""Measure one MoE layer against the dense SwiGLU of equal active width and Hugging Face's experts.

Legend: N tokens, D width, E experts, K experts per token, H expert hidden.

The limit for an MoE layer is the dense SwiGLU with intermediate K*H: the same matmul FLOPs, with
no routing or token movement. Implementations measured, on the same input, output gradient and
(for the MoE ones) the same weights:
- ``moelab``: ``moelab.MoE`` with default options (dropless softmax top-k, aux losses on; the aux
  loss joins the backward, so routing gradients are paid for);
- ``hf_eager`` / ``hf_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with its
  ``experts_implementation`` set to "eager" (loop over hit experts) or "grouped_mm";
- ``dense``: ``moelab.model.ffn.SwiGLU(D, K*H)``.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls, CUDA synchronised,
torch's thread count), in rounds that interleave the implementations, so a slow spell on a shared
machine hits all of them. Each implementation reports the median and interquartile range of its
per-call times over every block of every round; ratios are the median of per-round ratios.
Memory: the peak of bytes held by PyTorch's CPU allocator during one step, above what was held
before it (inputs and weights excluded, gradients of weights included), from the allocation and
free events of ``torch.profiler`` with ``profile_memory=True`` (its native log lines are kept off
the console). On CUDA we use ``torch.cuda.max_memory_allocated`` the same way. Benchmarks report;
they never assert speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from moelab.model.ffn import SwiGLU
from moelab.model.moe.layer import MoE

MODES = ("fwd+bwd", "fwd")


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int
    experts: int
    top_k: int
    expert_hidden: int

    def label(self) -> str:
        return f"N={self.tokens} D={self.d_model} E={self.experts} K={self.top_k} H={self.expert_hidden}"


@dataclass
class Impl:
    """One contender: ``run(x)`` returns (output, extra scalar loss or None)."""

    name: str
    module: nn.Module
    run: Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]
    expert_grad_bytes: int = 0     # bytes of routed-expert weight gradients (MoE only)


# --------------------------------------------------------------------------------------------
# Building the contenders
# --------------------------------------------------------------------------------------------

def build_impls(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0, hf: bool = True, backend: str = "auto") -> list[Impl]:
    torch.manual_seed(seed)
    D, E, K, H = shape.d_model, shape.experts, shape.top_k, shape.expert_hidden
    moe = MoE(D, E, K, H, backend=backend).to(device=device, dtype=dtype).train()
    expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())

    def run_moe(x):
        out = moe(x)
        return out.output, out.aux_loss

    impls = [Impl("moelab", moe, run_moe, expert_bytes)]
    if hf:
        for impl in ("eager", "grouped_mm"):
            block = hf_mixtral_block(moe, impl)
            if block is not None:
                block = block.to(device=device, dtype=dtype).train()
                impls.append(Impl(f"hf_{impl}", block, _run_plain(block, batched=True), expert_bytes))
    dense = SwiGLU(D, K * H).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(std=0.02)
    impls.append(Impl("dense", dense, _run_plain(dense, batched=False)))
    return impls


def _run_plain(module: nn.Module, batched: bool):
    def run(x):
        y = module(x.unsqueeze(0)) if batched else module(x)
        return (y.squeeze(0) if batched else y), None
    return run


def hf_mixtral_block(moe: MoE, experts_implementation: str) -> Optional[nn.Module]:
    """transformers' MixtralSparseMoeBlock with ``moe``'s router and expert weights copied in
    (both use the (E, 2H, D) gate-first / (E, D, H) layouts); None without transformers."""
    try:
        with native_output_silenced():     # optional native kernels of other packages announce themselves
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    E, D = moe.experts.w_gate_up.shape[0], moe.d_model
    cfg = MixtralConfig(hidden_size=D, intermediate_size=moe.experts.hidden, num_local_experts=E,
                        num_experts_per_tok=moe.cfg.top_k, router_jitter_noise=0.0,
                        experts_implementation=experts_implementation)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate)
        block.experts.gate_up_proj.copy_(moe.experts.w_gate_up)
        block.experts.down_proj.copy_(moe.experts.w_down)
    return block


# --------------------------------------------------------------------------------------------
# One step, agreement, timing, memory
# --------------------------------------------------------------------------------------------

def step(impl: Impl, x: torch.Tensor, grad: torch.Tensor, mode: str) -> torch.Tensor:
    """One forward (no_grad) or forward+backward with the given output gradient."""
    if mode == "fwd":
        with torch.no_grad():
            return impl.run(x)[0]
    for p in impl.module.parameters():
        p.grad = None
    x.grad = None
    out, extra = impl.run(x)
    tensors, grads = [out], [grad]
    if extra is not None and extra.requires_grad:
        tensors.append(extra)
        grads.append(torch.ones_like(extra))
    torch.autograd.backward(tensors, grads)
    return out


def check_agreement(impls: list[Impl], x: torch.Tensor, grad: torch.Tensor,
                    rtol: float = 1e-3, atol: float = 1e-4) -> dict[str, float]:
    """Every MoE implementation must give moelab's output and input gradient (ignoring the aux
    loss's share of the latter). Returns the max abs differences; raises on a mismatch."""
    moe_impls = [i for i in impls if i.name != "dense"]
    results = {}
    for impl in moe_impls:
        xx = x.detach().clone().requires_grad_(True)
        out, _ = impl.run(xx)
        out.backward(grad)
        results[impl.name] = (out.detach(), xx.grad)
    ref_out, ref_gx = results[moe_impls[0].name]
    errors = {}
    for name, (out, gx) in results.items():
        if name == moe_impls[0].name:
            continue
        errors[name] = max(float((out - ref_out).abs().max()), float((gx - ref_gx).abs().max()))
        if not (torch.allclose(out, ref_out, rtol=rtol, atol=atol)
                and torch.allclose(gx, ref_gx, rtol=rtol, atol=atol * 10)):
            raise AssertionError(f"{name} disagrees with {moe_impls[0].name}: max abs diff {errors[name]:.3g}")
    return errors


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what C++ code prints to stdout/stderr (the profiler's kineto lines) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def time_impls(impls: list[Impl], x: torch.Tensor, grad: torch.Tensor, mode: str,
               rounds: int = 7, warmup: int = 2, min_run_time: float = 0.05) -> dict[str, list]:
    """Per implementation, one ``torch.utils.benchmark`` Measurement per round (each a
    ``blocked_autorange`` of at least ``min_run_time`` seconds), rounds interleaved; ``warmup``
    untimed calls of each first."""
    from torch.utils import benchmark
    for _ in range(warmup):
        for impl in impls:
            step(impl, x, grad, mode)
    timers = {impl.name: benchmark.Timer(stmt="step(impl, x, grad, mode)", label=mode, sub_label=impl.name,
                                         globals={"step": step, "impl": impl, "x": x, "grad": grad, "mode": mode},
                                         num_threads=torch.get_num_threads())
              for impl in impls}
    times: dict[str, list] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return times


def peak_bytes(impl: Impl, x: torch.Tensor, grad: torch.Tensor, mode: str) -> int:
    """Peak bytes allocated during one step above the bytes held before it."""
    step(impl, x, grad, mode)              # warm: lazily created buffers do not count
    for p in impl.module.parameters():
        p.grad = None
    x.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step(impl, x, grad, mode)
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with native_output_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step(impl, x, grad, mode)
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


# --------------------------------------------------------------------------------------------
# A whole measurement and its report
# --------------------------------------------------------------------------------------------

def measure(shape: Shape, rounds: int = 7, warmup: int = 2, device: str = "cpu",
            dtype: torch.dtype = torch.float32, hf: bool = True, memory: bool = True,
            backend: str = "auto", seed: int = 0, min_run_time: float = 0.05) -> dict:
    """Agreement check, then timing of every mode, then peak memory of fwd+bwd. Returns a
    JSON-ready dict: medians in ms, ratios to dense and to each HF implementation."""
    impls = build_impls(shape, device, dtype, seed, hf, backend)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, dtype)
    # HF's grouped_mm fp32 path and ours differ by summation order only
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    errors = check_agreement(impls, x, grad, **tol)
    result = {"shape": asdict(shape), "dtype": str(dtype).replace("torch.", ""), "max_abs_diff": errors,
              "modes": {}}
    for mode in MODES:
        times = time_impls(impls, x, grad, mode, rounds, warmup, min_run_time)
        result["modes"][mode] = summarise(times)
    if memory:
        mem = {i.name: peak_bytes(i, x, grad, "fwd+bwd") for i in impls}
        result["peak_mb"] = {k: v / 2**20 for k, v in mem.items()}
        if "dense" in mem:
            # budget: 1.2x the dense layer's peak plus the routed experts' weight gradients
            budget = 1.2 * mem["dense"] + impls[0].expert_grad_bytes
            result["memory_budget_mb"] = budget / 2**20
            result["memory_vs_budget"] = mem["moelab"] / budget
    return result


def summarise(times: dict[str, list]) -> dict:
    """Per implementation, the median and IQR in ms of its per-call times (all blocks of all
    rounds, merged); the median per-round ratio of each to dense (``x_dense``, > 1 = slower than
    dense) and of each HF implementation's time to moelab's (``speedup_vs``, > 1 = moelab faster)."""
    from torch.utils.benchmark import Measurement
    merged = {k: Measurement.merge(v)[0] for k, v in times.items()}
    out = {"median_ms": {k: 1e3 * m.median for k, m in merged.items()},
           "iqr_ms": {k: 1e3 * m.iqr for k, m in merged.items()},
           "calls": {k: sum(len(r.times) * r.number_per_run for r in v) for k, v in times.items()}}
    per_round = {k: [r.median for r in v] for k, v in times.items()}
    if "dense" in times:
        out["x_dense"] = {k: _median_ratio(v, per_round["dense"]) for k, v in per_round.items() if k != "dense"}
    if "moelab" in times:
        out["speedup_vs"] = {k: _median_ratio(v, per_round["moelab"]) for k, v in per_round.items()
                             if k.startswith("hf_")}
    return out


def faster_or_slower(ratio: float) -> str:
    """``other time / our time`` in words: 2.40 -> "2.40x faster", 0.41 -> "2.44x slower"."""
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower"


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "transformers": _transformers_version()}


def _transformers_version() -> Optional[str]:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


def format_table(results: list[dict]) -> str:
    """Markdown table: one row per shape and mode; times as median ± IQR."""
    names = [n for n in results[0]["modes"]["fwd+bwd"]["median_ms"] if n != "dense"]
    head = ["shape (N, H, E, K)", "mode", "dense ms (± IQR)"] + [f"{n} ms (± IQR)" for n in names] + \
        [f"{n} ×dense" for n in names] + [f"moelab vs {n}" for n in names if n.startswith("hf_")] + \
        ["peak MB moelab / dense / budget"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["shape"]
        label = f"{s['tokens']}, {s['expert_hidden']}, {s['experts']}, {s['top_k']}"
        for mode, m in r["modes"].items():
            row = [label, mode] + [_ms(m, n) for n in ["dense"] + names]
            row += [f"{m['x_dense'][n]:.2f}×" for n in names]
            row += [faster_or_slower(m["speedup_vs"][n]) for n in names if n.startswith("hf_")]
            if mode == "fwd+bwd" and "peak_mb" in r:
                p = r["peak_mb"]
                row.append(f"{p['moelab']:.4g} / {p['dense']:.4g} / {r['memory_budget_mb']:.4g}")
            else:
                row.append("")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ms(m: dict, name: str) -> str:
    return f"{m['median_ms'][name]:.3g} ± {m['iqr_ms'][name]:.2g}"


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
