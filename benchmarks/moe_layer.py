"""MoE layer vs the equal-active dense SwiGLU and Hugging Face's experts implementations.

    python benchmarks/moe_layer.py [--rounds 7] [--threads 2] [--json results.json]

For every shape (the issue-8 table plus a decode-sized one), on the same input and weights:
checks that moelab, HF eager and HF grouped_mm agree, then times forward+backward and forward-only
(interleaved rounds, medians), and measures the peak memory of forward+backward. Prints a markdown
table of time relative to dense and moelab's speedup over HF; never asserts speed. The measuring
code lives in ``moelab.benchmarking`` so that ``moelab bench moe`` runs exactly the same thing.
"""

from __future__ import annotations

import argparse

import torch

from moelab.benchmarking import Shape, environment, format_table, measure, write_json

D_MODEL = 512
# (tokens, expert hidden, experts, top-k): issue 8's table, then a decode-sized batch
SHAPES = [(4096, 1024, 8, 2), (4096, 256, 64, 8), (4096, 128, 128, 16), (256, 256, 64, 8),
          (16, 256, 64, 8)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per mode (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shapes", help="only these rows of SHAPES, e.g. 0,2")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    env = environment()
    print(f"# {env['date']} torch {env['torch']} transformers {env['transformers']} "
          f"threads {env['threads']} {env['platform']} {env['cuda'] or ''}", flush=True)
    results = []
    for tokens, hidden, experts, top_k in rows:
        shape = Shape(tokens=tokens, d_model=D_MODEL, experts=experts, top_k=top_k, expert_hidden=hidden)
        r = measure(shape, rounds=args.rounds, device=args.device, dtype=getattr(torch, args.dtype),
                    memory=not args.no_memory)
        results.append(r)
        print(format_table([r]), flush=True)           # progress: one shape at a time
    print("\n" + format_table(results))
    if args.json:
        write_json(args.json, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
