"""How fast can a training step of this model be? The kernels every implementation must run,
replayed alone, against the real steps of ours and of Hugging Face's Mixtral.

    python benchmarks/train_floor.py                 # 2 threads, fp32, CPU, issue 4's sizes
    python benchmarks/train_floor.py --rounds 9 --json train_floor.json

Why: ``train_throughput.py`` reports ours / HF. Both models run the same matmuls (same shapes,
same FLOPs: the experts' top-2 products, attention projections, LM head, each forward and two
backward GEMMs), the same kind of attention kernel and an AdamW update of the same parameters. Those
kernels set a floor under any implementation's step; what an implementation controls is the rest
(elementwise passes, dispatch, allocation, Python). So the best ratio any implementation could
reach against HF is ``HF step / floor``, and the fraction of HF's non-floor time we removed says
how much of the avoidable work is gone.

What is replayed: one step of ours is recorded with ``torch.profiler`` (``record_shapes``); every
GEMM it ran (``aten::mm``, ``addmm``, ``addmm_``, ``bmm``, ``_grouped_mm``) is re-run with the same
shapes on fresh random operands and preallocated outputs, every flash-attention forward is re-run
forward + backward with its shapes, and a fused AdamW step over the model's parameters is timed.
Replayed kernels find their operands warm in cache and their outputs already paged in, so the
floor is optimistic: a real step cannot reach it, and the ceiling ``HF / floor`` is an upper bound.

Timing: rounds interleave ours, HF grouped_mm and the replay (each ``--steps`` steps or replays),
after warm-up; we report medians and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moelab.benchmarking import environment
from moelab.model.transformer import Transformer
from moelab.presets import load_preset
from train_throughput import Contender, hf_contender, ours_contender, train_step

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm"}
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def recorded_kernels(c: Contender, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict:
    """GEMM operand shapes and attention (q, k, v) shapes of one step of ``c``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(c, x, y, clip)
    gemms, attention = [], []
    for e in prof.events():
        if _inside(e, GEMMS):
            continue                     # e.g. the per-group mm of a CPU grouped_mm: counted once
        shapes = e.input_shapes
        if e.name in ("aten::mm", "aten::bmm"):
            gemms.append((tuple(shapes[0]), tuple(shapes[1])))
        elif e.name in ("aten::addmm", "aten::addmm_"):
            gemms.append((tuple(shapes[1]), tuple(shapes[2])))
        elif e.name == "aten::_grouped_mm":
            # (M, K) x (G, K, N) with offsets: replayed as the same total work, one (M, K) x (K, N)
            a, b = shapes[0], shapes[1]
            if len(a) == 2 and len(b) == 3:
                gemms.append(((a[0], a[1]), (b[1], b[2])))
            elif len(a) == 2 and len(b) == 2:          # weight gradient: (K, M) x (M, N) -> (G, K, N)
                gemms.append(((a[0], a[1]), (b[0], b[1])))
        elif e.name == FLASH:
            attention.append(tuple(tuple(s) for s in shapes[:3]))
    return {"gemms": gemms, "attention": attention}


def _inside(event, names: set) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def gemm_flops(gemms: list) -> float:
    total = 0.0
    for a, b in gemms:
        batch = a[0] if len(a) == 3 else 1
        m, k = a[-2], a[-1]
        total += 2.0 * batch * m * k * b[-1]
    return total


class Replay:
    """The floor kernels of one step, on preallocated operands."""

    def __init__(self, kernels: dict, params: list[torch.Tensor], lr: float):
        self.gemms = []
        for a, b in kernels["gemms"]:
            A, B = torch.randn(a), torch.randn(b)
            out = torch.empty(*a[:-1], b[-1])
            self.gemms.append((A, B, out))
        self.attention = []
        for q, k, v in kernels["attention"]:
            Q, K, V = (torch.randn(s, requires_grad=True) for s in (q, k, v))
            self.attention.append((Q, K, V, torch.randn(q[:-1] + (v[-1],))))
        self.params = [torch.zeros_like(p, requires_grad=True) for p in params]
        for p in self.params:
            p.grad = torch.randn_like(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, fused=True)

    def gemm_pass(self) -> None:
        for A, B, out in self.gemms:
            (torch.bmm if A.dim() == 3 else torch.mm)(A, B, out=out)

    def attention_pass(self) -> None:
        for Q, K, V, grad in self.attention:
            gqa = K.shape[1] != Q.shape[1]
            F.scaled_dot_product_attention(Q, K, V, is_causal=True, enable_gqa=gqa).backward(grad)
            Q.grad = K.grad = V.grad = None

    def optimizer_pass(self) -> None:
        self.optimizer.step()

    def timed(self) -> dict[str, float]:
        out = {}
        for name, fn in (("gemm", self.gemm_pass), ("attention", self.attention_pass),
                         ("adamw", self.optimizer_pass)):
            t0 = time.perf_counter()
            fn()
            out[name] = time.perf_counter() - t0
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="steps (or replays) per contender per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_preset("mixtral").with_overrides(
        {"train.batch_size": args.batch, "train.seq_len": args.seq}).validate()
    torch.manual_seed(args.seed)
    ours_model = Transformer(cfg.model).train()
    ours = ours_contender(ours_model, cfg.train)
    hf = hf_contender(ours_model, "grouped_mm", cfg.train, "fused")
    g = torch.Generator().manual_seed(args.seed)
    windows = [torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    clip = cfg.train.grad_clip

    for c in (ours, hf):
        for i in range(args.warmup):
            w = windows[i % len(windows)]
            train_step(c, w[:, :-1], w[:, 1:], clip)
    w = windows[0]
    kernels = {c.name: recorded_kernels(c, w[:, :-1], w[:, 1:], clip) for c in (ours, hf)}
    flops = {k: gemm_flops(v["gemms"]) for k, v in kernels.items()}
    replay = Replay(kernels["ours"], list(ours_model.parameters()), cfg.train.lr)
    for _ in range(args.warmup):
        replay.timed()

    env = environment()
    print(f"# {env['date']} torch {env['torch']} transformers {env['transformers']} "
          f"threads {env['threads']} {env['platform']}", flush=True)
    print("# GEMM GFLOP per step: " + ", ".join(f"{k} {v / 1e9:.2f} ({len(kernels[k]['gemms'])} calls)"
                                              for k, v in flops.items()), flush=True)

    step_ms: dict[str, list[float]] = {"ours": [], "hf_grouped_mm": [], "floor": []}
    parts_ms: dict[str, list[float]] = {"gemm": [], "attention": [], "adamw": []}
    step_of = {"ours": 0, "hf_grouped_mm": 0}
    for r in range(args.rounds):
        order = ["ours", "hf_grouped_mm", "floor"]
        order = order[r % 3:] + order[:r % 3]
        for name in order:
            if name == "floor":
                runs = [replay.timed() for _ in range(args.steps)]
                for part in parts_ms:
                    parts_ms[part].append(1e3 * statistics.mean(x[part] for x in runs))
                step_ms["floor"].append(sum(parts_ms[part][-1] for part in parts_ms))
                continue
            c = ours if name == "ours" else hf
            t0 = time.perf_counter()
            for _ in range(args.steps):
                w = windows[step_of[name] % len(windows)]
                train_step(c, w[:, :-1], w[:, 1:], clip)
                step_of[name] += 1
            step_ms[name].append(1e3 * (time.perf_counter() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in step_ms.items()),
              flush=True)

    med = {k: statistics.median(v) for k, v in {**step_ms, **parts_ms}.items()}
    def per_round(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(step_ms[a], step_ms[b]))
    ratio = per_round("hf_grouped_mm", "ours")
    ceiling = per_round("hf_grouped_mm", "floor")
    removed = statistics.median((h - o) / (h - f) for h, o, f in
                                zip(step_ms["hf_grouped_mm"], step_ms["ours"], step_ms["floor"]))
    print("\n| | ms per step (median) |\n|---|---:|")
    for k in ("ours", "hf_grouped_mm", "floor", "gemm", "attention", "adamw"):
        print(f"| {k} | {med[k]:.1f} |")
    print(f"\nours / HF speed: {ratio:.2f}x; ceiling (HF / floor): {ceiling:.2f}x; "
          f"share of HF's above-floor time that ours removes: {removed:.0%}")
    gemm_rate = flops["ours"] / (med["gemm"] / 1e3) / 1e9
    print(f"replayed GEMMs: {gemm_rate:.0f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"step_ms": step_ms, "parts_ms": parts_ms, "median_ms": med, "ratio": ratio,
                       "ceiling": ceiling, "removed_share": removed, "gemm_flops": flops,
                       "gemm_calls": {k: len(v["gemms"]) for k, v in kernels.items()},
                       "settings": vars(args), "environment": env}, f, indent=2, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
