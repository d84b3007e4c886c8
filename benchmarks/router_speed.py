"""Training step time of each router of docs/routers.md against softmax top-2, side by side.

The router study's tokens/s came from units minutes apart on a shared machine, so the load moved
them more than the routers did. Here every model trains in this one process, in interleaved rounds
(each round times a few optimiser steps of every model in turn, the order rotated each round), and
the ratio to the reference is taken per round before the median, so a load change between rounds
cancels out. Real tokens: the built-in corpus, as the study.

    python benchmarks/router_speed.py [--rounds 7] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

STUDY = Path(__file__).resolve().parents[1] / "docs" / "routers" / "study"
MODELS = ["topk", "hash", "sbase", "reinforce", "remoe", "hetero", "groups"]


def _setup(name: str, tokens, batch: int, seq: int):
    import moelab
    from moelab.model.moe.hash_table import fit_hash_routers
    from moelab.model.transformer import Transformer
    from moelab.train.optim import build_optimizer
    cfg = moelab.resolve_config(STUDY / f"{name}.toml", [f"train.batch_size={batch}", f"train.seq_len={seq}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    fit_hash_routers(model, tokens)
    return model, build_optimizer(model, cfg.train)


def _step(model, opt, x, y) -> None:
    out = model(x, targets=y)
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_router_biases()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps per model and round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    import moelab
    from moelab.data import prepare_data
    cfg = moelab.resolve_config(STUDY / "topk.toml")
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda m: None)
    stream = torch.from_numpy(data.train_tokens[: a.batch * (a.seq + 1) * 64].astype("int64"))
    windows = stream[: (stream.numel() // (a.seq + 1)) * (a.seq + 1)].view(-1, a.seq + 1)
    batches = [(windows[i:i + a.batch, :-1], windows[i:i + a.batch, 1:]) for i in range(0, windows.shape[0] - a.batch + 1, a.batch)]
    runs = {name: _setup(name, data.train_tokens, a.batch, a.seq) for name in MODELS}
    for model, opt in runs.values():                     # warm-up: first steps allocate
        for x, y in batches[:2]:
            _step(model, opt, x, y)
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    for r in range(a.rounds):
        order = MODELS[r % len(MODELS):] + MODELS[:r % len(MODELS)]
        for name in order:
            model, opt = runs[name]
            t0 = time.perf_counter()
            for s in range(a.steps):
                x, y = batches[(r * a.steps + s) % len(batches)]
                _step(model, opt, x, y)
            times[name].append((time.perf_counter() - t0) / a.steps)
    tokens = a.batch * a.seq
    rows = []
    for name in MODELS:
        ratios = [t / ref for t, ref in zip(times[name], times["topk"])]
        rows.append({"model": name, "step_s_median": statistics.median(times[name]),
                     "tokens_per_s_median": tokens / statistics.median(times[name]),
                     "speed_vs_topk_median": 1 / statistics.median(ratios),
                     "speed_vs_topk_min_max": [1 / max(ratios), 1 / min(ratios)]})
    print(f"{a.rounds} rounds x {a.steps} steps of {a.batch} x {a.seq} tokens, torch threads {torch.get_num_threads()}")
    print("| model | step (median) | tokens/s | speed vs topk (median of per-round ratios) | range |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        lo, hi = r["speed_vs_topk_min_max"]
        print(f"| {r['model']} | {r['step_s_median'] * 1000:.0f} ms | {r['tokens_per_s_median']:,.0f} | "
              f"{r['speed_vs_topk_median']:.2f}x | {lo:.2f}-{hi:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
