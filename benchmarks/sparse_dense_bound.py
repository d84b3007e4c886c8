"""How close to the dense model's training speed the default study's sparse models can get with
torch's own CPU kernels: a bound, measured.

    python benchmarks/sparse_dense_bound.py                  # dense, moe, hybrid as compare trains them
    python benchmarks/sparse_dense_bound.py --rounds 20 --json bound.json

At equal active parameters a sparse model does the dense model's matmul FLOPs per token, so
``benchmarks/compare_throughput.py`` holds its tokens/s against 1.0x of dense. Two costs stay even
with routing, dispatch and combine free, and this script measures both on the models ``moelab
compare`` trains (no arguments), with their real shapes:

- **expert GEMMs**: the six matrix products of a MoE layer's forward and backward (gate/up, down;
  dL/dh, dL/dW_down, dL/dW_gate_up, dL/dx), run per expert as the CPU engine runs them, over the
  rows each expert receives from the model's own router on a real training batch, against the
  dense SwiGLU's six products over all tokens. Also shown: the same per-expert products as one
  ``bmm`` with every expert given exactly N*K/E rows (a perfectly balanced router; the loads
  measured in ``moelab compare`` runs are 1.5-2.4x max/mean, where padding costs more than it
  saves);
- **the optimiser step**: fused AdamW over each model's parameters (2.3x the dense model's for
  moe), which runs at memory bandwidth.

The dense model's whole training step is timed the way ``compare_throughput.py`` does, and each
sparse model's bound is dense step / (dense step + MoE layers x extra GEMM time + extra AdamW
time). Timing: rounds interleave every measurement; medians. Benchmarks report, never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_throughput import build_contenders, train_step  # noqa: E402

from moelab.benchmarking import environment  # noqa: E402
from moelab.compare import DEFAULT_MATCH, DEFAULT_MODELS  # noqa: E402
from moelab.data import TokenBatches, prepare_data  # noqa: E402
from moelab.train.allocator import reuse_freed_memory  # noqa: E402


def expert_gemms(counts: list[int], D: int, H: int) -> Callable[[], None]:
    """The loop engine's six products per expert, rows as given."""
    E, M = len(counts), sum(counts)
    x, dy = torch.randn(M, D), torch.randn(M, D)
    h, g = torch.randn(M, H), torch.randn(M, 2 * H)
    w_gu, w_d = torch.randn(E, 2 * H, D), torch.randn(E, D, H)
    o_2h, o_d, o_h = torch.empty(M, 2 * H), torch.empty(M, D), torch.empty(M, H)
    gw_gu, gw_d = torch.empty_like(w_gu), torch.empty_like(w_d)
    bounds, pos = [], 0
    for c in counts:
        bounds.append((pos, pos + c))
        pos += c

    def run() -> None:
        for e, (s, t) in enumerate(bounds):
            if s == t:
                continue
            torch.mm(x[s:t], w_gu[e].t(), out=o_2h[s:t])            # gate | up
            torch.mm(h[s:t], w_d[e].t(), out=o_d[s:t])              # down
            torch.mm(dy[s:t], w_d[e], out=o_h[s:t])                 # dL/dh
            torch.mm(dy[s:t].t(), h[s:t], out=gw_d[e])              # dL/dW_down
            torch.mm(g[s:t].t(), x[s:t], out=gw_gu[e])              # dL/dW_gate_up
            torch.mm(g[s:t], w_gu[e], out=o_d[s:t])                 # dL/dx
    return run


def balanced_bmm(E: int, rows: int, D: int, H: int) -> Callable[[], None]:
    """The same six products as one bmm each, every expert with ``rows`` rows."""
    x, dy = torch.randn(E, rows, D), torch.randn(E, rows, D)
    h, g = torch.randn(E, rows, H), torch.randn(E, rows, 2 * H)
    w_gu, w_d = torch.randn(E, 2 * H, D), torch.randn(E, D, H)

    def run() -> None:
        torch.bmm(x, w_gu.transpose(1, 2))
        torch.bmm(h, w_d.transpose(1, 2))
        torch.bmm(dy, w_d)
        torch.bmm(dy.transpose(1, 2), h)
        torch.bmm(g.transpose(1, 2), x)
        torch.bmm(g, w_gu)
    return run


def dense_gemms(N: int, D: int, F: int) -> Callable[[], None]:
    """A dense SwiGLU's six products (F = its hidden width)."""
    x, dy = torch.randn(N, D), torch.randn(N, D)
    h, g = torch.randn(N, F), torch.randn(N, 2 * F)
    w_gu, w_d = torch.randn(2 * F, D), torch.randn(D, F)

    def run() -> None:
        torch.mm(x, w_gu.t())
        torch.mm(h, w_d.t())
        torch.mm(dy, w_d)
        torch.mm(dy.t(), h)
        torch.mm(g.t(), x)
        torch.mm(g, w_gu)
    return run


def adamw_step(model: torch.nn.Module) -> Callable[[], None]:
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return opt.step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every model, as in compare_throughput.py")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    reuse_freed_memory()

    names = list(DEFAULT_MODELS)
    contenders, cfg = build_contenders(names, args.overrides, DEFAULT_MATCH)
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda _m: None)
    t = contenders[0].train_cfg
    batches = TokenBatches(data.train_tokens, t.batch_size, t.seq_len, t.seed)
    N = t.batch_size * t.seq_len
    dense = next(c for c in contenders if c.kind == "dense")
    D, F = dense.model.config.d_model, dense.model.config.ffn_hidden

    timed: dict[str, Callable[[], None]] = {}
    x0, _ = batches.batch(0)

    def dense_step() -> None:
        x, y = batches.batch(dense.step)
        train_step(dense, x, y)
    timed["dense step"] = dense_step
    timed["dense FFN GEMMs"] = dense_gemms(N, D, F)
    timed[f"AdamW {dense.name}"] = adamw_step(dense.model)
    layers: dict[str, list[str]] = {}
    for c in contenders:
        if c.kind == "dense":
            continue
        timed[f"AdamW {c.name}"] = adamw_step(c.model)
        layers[c.name] = []
        # each MoE layer's own routing of a real batch (the loads its first steps see)
        captured: list = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out.stats.tokens_per_expert))
                 for m in c.model.moe_layers()]
        with torch.no_grad():
            c.model(x0)
        for hk in hooks:
            hk.remove()
        for i, counts in enumerate(captured):
            moe = c.model.moe_layers()[i]
            H, E, K = moe.experts.hidden, moe.num_experts, moe.cfg.top_k
            key = f"{c.name} layer {i} expert GEMMs (loads {'/'.join(str(int(v)) for v in counts.tolist())})"
            timed[key] = expert_gemms([int(v) for v in counts.tolist()], D, H)
            layers[c.name].append(key)
            bal = f"expert GEMMs, balanced bmm E={E} x {N * K // E} rows, H={H}"
            if bal not in timed:
                timed[bal] = balanced_bmm(E, N * K // E, D, H)

    for f in timed.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in timed}
    keys = list(timed)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            timed[k]()
            times[k].append((time.perf_counter() - start) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}

    env = environment()
    print(f"# {env['date']} torch {env['torch']} threads {env['threads']} {env['platform']}; "
          f"{args.rounds} rounds, medians")
    print("| measurement | ms |\n|---|---:|")
    for k in keys:
        print(f"| {k} | {med[k]:.2f} |")
    step = med["dense step"]
    bounds = {}
    print(f"\n| model | MoE layers | extra GEMM ms per step | extra AdamW ms | bound (dense step {step:.0f} ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, keys_ in layers.items():
        gemm = sum(med[k] - med["dense FFN GEMMs"] for k in keys_)
        adam = med[f"AdamW {name}"] - med[f"AdamW {dense.name}"]
        bounds[name] = step / (step + gemm + adam)
        print(f"| {name} | {len(keys_)} | {gemm:.1f} | {adam:.1f} | **{bounds[name]:.3f}x** |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "rounds": args.rounds, "median_ms": med, "bound": bounds}, f, indent=2)


if __name__ == "__main__":
    main()
