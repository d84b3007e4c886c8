"""Training throughput of the default `moelab compare` study's models, side by side.

    python benchmarks/compare_throughput.py                    # dense, moe, hybrid as compare trains them
    python benchmarks/compare_throughput.py --blocks 12 --json compare_throughput.json
    python benchmarks/compare_throughput.py --models dense,moe --set model.n_layers=2

The models are the ones ``moelab compare`` (no arguments) trains: its default presets, sized by
its default ``--match`` (``moelab.compare.matching``), with the train settings of its default
budget (batch, sequence length, warmup) applied through ``moelab.compare.plan.budget_overrides``.
At equal active parameters the sparse models do the same matmul FLOPs per token as the dense one
(``moelab info``), so a sparse/dense ratio of 1.0 is the limit; what is below it is the price of
routing, dispatch, router statistics, aux losses and an optimiser over more parameters.

One process trains every model, each from ``train.seed`` with its own optimiser, on the same real
training batches (the built-in corpus, ``TokenBatches``), stepping as ``moelab.train.trainer``
does at grad_accum=1 with compare's ``train.log_every=1``: forward with targets (the fused LM
head + loss), loss + aux loss, the finite-loss check, backward, gradient clipping
(``moelab.parallel.clip``), AdamW step, router bias update, ``zero_grad``, and every step the
router-statistics host reads the trainer logs (``RouterStats.summary`` and the per-expert
load). Evaluation and checkpoints are left out.

Timing: ``--warmup`` untimed steps per model, then ``--blocks`` rounds, each running ``--steps``
steps of every model with the order rotating per round, so a slow spell on a shared machine hits
all of them. We print each model's median tokens/s over rounds and each sparse model's median of
per-round ratios to the dense model. Benchmarks report; they never assert speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from moelab import resolve_config
from moelab.benchmarking import environment
from moelab.compare import DEFAULT_BUDGET, DEFAULT_MATCH, DEFAULT_MODELS, parse_budget
from moelab.compare.matching import match_models
from moelab.compare.plan import budget_overrides
from moelab.data import TokenBatches, prepare_data
from moelab.model.transformer import Transformer
from moelab.train.allocator import reuse_freed_memory
from moelab.parallel.clip import clip_grad_norm_
from moelab.train.optim import build_optimizer, lr_at


@dataclass
class Contender:
    name: str
    kind: str
    model: Transformer
    optimizer: torch.optim.Optimizer
    train_cfg: object
    step: int = 0


def build_contenders(names: list[str], overrides: list[str], match: str) -> tuple[list[Contender], object]:
    configs = [resolve_config(n, overrides) for n in names]
    sizings = match_models(names, [c.model for c in configs], match)
    budget = parse_budget(DEFAULT_BUDGET)
    out = []
    for name, cfg, sizing in zip(names, configs, sizings):
        extra = budget_overrides(budget, cfg.train.batch_size, cfg.train.seq_len)
        cfg = resolve_config(name, overrides + sizing.overrides + extra)
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model).train()
        kind = "dense" if not model.moe_layers() else (
            "moe" if len(model.moe_layers()) == cfg.model.n_layers else "hybrid")
        out.append(Contender(name, kind, model, build_optimizer(model, cfg.train), cfg.train))
    return out, configs[0]


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step as the trainer takes it at grad_accum=1 and log_every=1."""
    t = c.train_cfg
    lr = lr_at(c.step, min(1.0, c.step / 400), t)
    for group in c.optimizer.param_groups:
        group["lr"] = lr
    out = c.model(x, targets=y)
    loss = out.loss + out.aux_loss
    if not torch.isfinite(loss):
        raise RuntimeError(f"{c.name}: non-finite loss at step {c.step}")
    loss.backward()
    ce = out.loss.item()
    out.aux_loss.item()
    clip_grad_norm_(c.model.parameters(), t.grad_clip or float("inf"))
    c.optimizer.step()
    c.model.update_router_biases()
    c.optimizer.zero_grad(set_to_none=True)
    for s in out.router_stats:                     # what the trainer logs every step
        s.summary()
        (s.tokens_per_expert / s.tokens_per_expert.sum().clamp_min(1)).tolist()
    c.step += 1
    return ce


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--match", default=DEFAULT_MATCH)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--blocks", type=int, default=8, help="timed rounds (each runs every model)")
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's malloc as it is (the trainer keeps freed memory for reuse: "
                        "moelab.train.allocator)")
    args = p.parse_args()
    if not args.glibc_default:
        reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    contenders, cfg = build_contenders(names, args.overrides, args.match)
    dense = next((c for c in contenders if c.kind == "dense"), contenders[0])
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda _m: None)
    t = contenders[0].train_cfg
    batches = TokenBatches(data.train_tokens, t.batch_size, t.seq_len, t.seed)
    tokens_per_step = t.batch_size * t.seq_len
    env = environment()
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"# {env['date']} torch {env['torch']} threads {env['threads']} {env['platform']}; "
          f"glibc malloc {'as is' if args.glibc_default else 'keeping freed memory'}; "
          f"load average at start {load}", flush=True)
    for c in contenders:
        n = sum(p.numel() for p in c.model.parameters())
        print(f"# {c.name} ({c.kind}): {n / 1e6:.2f}M params, batch {t.batch_size} x seq {t.seq_len} "
              f"= {tokens_per_step} tokens/step", flush=True)

    def run(c: Contender, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            x, y = batches.batch(c.step)              # every model sees the same batches in order
            train_step(c, x, y)
        return time.perf_counter() - start

    for c in contenders:
        run(c, args.warmup)
    tps: dict[str, list[float]] = {c.name: [] for c in contenders}
    for b in range(args.blocks):
        order = contenders[b % len(contenders):] + contenders[:b % len(contenders)]
        for c in order:
            tps[c.name].append(tokens_per_step * args.steps / run(c, args.steps))
        print(f"block {b + 1}/{args.blocks}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in tps.items())
              + " tokens/s", flush=True)

    med = {k: statistics.median(v) for k, v in tps.items()}
    ratio = {k: statistics.median(x / y for x, y in zip(v, tps[dense.name])) for k, v in tps.items()}
    spread = {k: (min(x / y for x, y in zip(v, tps[dense.name])), max(x / y for x, y in zip(v, tps[dense.name])))
              for k, v in tps.items()}
    end_load = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at end {end_load}")
    print(f"| model | kind | median tokens/s | / {dense.name} (median of per-round ratios) | range over rounds |")
    print("|---|---|---:|---:|---|")
    for c in contenders:
        lo, hi = spread[c.name]
        print(f"| {c.name} | {c.kind} | {med[c.name]:,.0f} | {ratio[c.name]:.3f}x | {lo:.3f}-{hi:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "load_average": [load, end_load], "args": vars(args),
                       "tokens_per_s": tps, "median_tokens_per_s": med, "ratio_to_dense": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
