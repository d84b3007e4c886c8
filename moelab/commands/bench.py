"""`moelab bench moe`: time one MoE layer against the equal-active dense SwiGLU and Hugging Face's
experts implementations, for the user's own shape (the measurement of benchmarks/moe_layer.py).

`moelab bench decode RUN --engine both`: batch-1 decode tokens/s of a run with the torch engine and
llama.cpp, and each as a fraction of the memory-bandwidth limit (moelab.decode_bench)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a component")
    what = p.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    m = what.add_parser("moe", help="one MoE layer vs dense SwiGLU (intermediate = top_k * hidden) and HF")
    m.add_argument("--tokens", type=int, default=4096, help="tokens N in the batch")
    m.add_argument("--d-model", type=int, default=512)
    m.add_argument("--experts", type=int, default=64)
    m.add_argument("--top-k", type=int, default=8)
    m.add_argument("--expert-hidden", type=int, default=256)
    m.add_argument("--rounds", type=int, default=7,
                   help="interleaved timing rounds per mode (after 2 warm-up calls each)")
    m.add_argument("--min-time", type=float, default=0.05, metavar="SECONDS",
                   help="per round and implementation: torch.utils.benchmark's blocked_autorange "
                        "runs blocks of calls for at least this long")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--backend", default="auto", choices=["auto", "grouped_mm", "loop"],
                   help="moelab's expert GEMM engine")
    m.add_argument("--no-hf", action="store_true", help="skip the Hugging Face implementations")
    m.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=run_moe)
    _add_decode(what)


def _add_decode(what) -> None:
    d = what.add_parser("decode", help="batch-1 decode tokens/s of a run: torch engine vs llama.cpp")
    d.add_argument("run", metavar="RUN", help="run folder")
    d.add_argument("--engine", choices=("torch", "llama.cpp", "both"), default="both")
    d.add_argument("--type", default="bf16", help="llama.cpp GGUF type (default bf16; q8_0 = int8)")
    d.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="torch engine dtype")
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--repeats", type=int, default=3, help="timed rounds per engine (after a warm-up)")
    d.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_decode)


def run_decode(args) -> int:
    import sys

    from moelab.commands import raise_user
    from moelab.config import MAX_SEQ_LEN
    for name, high in (("new_tokens", MAX_SEQ_LEN), ("prompt_len", MAX_SEQ_LEN), ("repeats", MAX_ROUNDS)):
        low = 2 if name == "new_tokens" else 1
        if not low <= getattr(args, name) <= high:
            raise_user(f"--{name.replace('_', '-')} = {getattr(args, name)} is invalid: must be >= "
                       f"{low} and <= {high:,}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise_user(f"--threads = {args.threads} is invalid: must be > 0 and <= {MAX_THREADS:,}")
    import torch

    from moelab.decode_bench import measure
    from moelab.interop import InteropError
    from moelab.interop.gguf import check_type
    from moelab.runfolder import CheckpointError
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = ("torch", "llama.cpp") if args.engine == "both" else (args.engine,)
    try:
        if "llama.cpp" in engines:
            check_type(args.type)
        result = measure(args.run, engines, gguf_type=args.type, dtype=args.dtype, new_tokens=args.new_tokens,
                         prompt_len=args.prompt_len, repeats=args.repeats,
                         log=lambda s: print(s, file=sys.stderr))
    except (InteropError, CheckpointError) as e:
        raise_user(str(e))
    from moelab.decode_bench import environment
    result["environment"] = environment()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.run}: {result['read_params_per_token'] / 1e6:.1f}M parameters read per token, memory bandwidth "
          f"{result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> bf16 limit "
          f"{result['bf16_limit_tokens_per_s']:.1f} tokens/s")
    print(f"  {'engine':<18} {'tokens/s':>9} {'of bf16 limit':>14}")
    for name, r in result["engines"].items():
        print(f"  {name:<18} {r['tokens_per_s']:>9.2f} {r['fraction_of_bf16_limit']:>14.2f}")
    if "greedy_agreement" in result:
        print(f"  greedy tokens equal at {result['greedy_agreement']:.0%} of {args.new_tokens} positions")
    return 0


MAX_ROUNDS = 10_000
MAX_THREADS = 4096


def _check(args) -> None:
    from moelab.commands import check_device, raise_user
    from moelab.config import MAX_EXPERTS, MAX_SEQ_LEN, MAX_WIDTH
    from moelab.resources import available_on, refuse_unless_fits
    for name, high in (("tokens", MAX_SEQ_LEN), ("d_model", MAX_WIDTH), ("experts", MAX_EXPERTS),
                       ("top_k", MAX_EXPERTS), ("expert_hidden", MAX_WIDTH), ("rounds", MAX_ROUNDS)):
        value = getattr(args, name)
        if not 1 <= value <= high:
            raise_user(f"--{name.replace('_', '-')} = {value} is invalid: must be > 0 and <= {high:,}")
    if args.top_k > args.experts:
        raise_user(f"--top-k = {args.top_k} is invalid: must be <= --experts ({args.experts})")
    if not 0 < args.min_time <= 3600:
        raise_user(f"--min-time = {args.min_time} is invalid: must be > 0 and <= 3600 seconds")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise_user(f"--threads = {args.threads} is invalid: must be > 0 and <= {MAX_THREADS:,}")
    check_device(args.device)
    # the least the layer holds: its expert weights (gate, up, down) and, per routed token copy,
    # its input and hidden rows, in float32 (the widest --dtype)
    d, h = args.d_model, args.expert_hidden
    needed = 4 * (args.experts * 3 * d * h + args.tokens * args.top_k * (d + 2 * h) + args.tokens * d)
    refuse_unless_fits(needed, available_on(args.device), "this benchmark's MoE layer", args.device,
                       "use smaller --tokens, --experts, --d-model or --expert-hidden")


def run_moe(args) -> int:
    _check(args)
    import torch

    from moelab.benchmarking import Shape, environment, faster_or_slower, format_table, measure
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(tokens=args.tokens, d_model=args.d_model, experts=args.experts, top_k=args.top_k,
                  expert_hidden=args.expert_hidden)
    result = measure(shape, rounds=args.rounds, device=args.device, dtype=getattr(torch, args.dtype),
                     hf=not args.no_hf, memory=not args.no_memory, backend=args.backend,
                     min_run_time=args.min_time)
    if args.json:
        print(json.dumps({"environment": environment(), **result}))
        return 0
    env = environment()
    print(f"{shape.label()}  {args.dtype} on {args.device}, torch {env['torch']}, {env['threads']} threads; "
          f"median ± IQR over {args.rounds} interleaved rounds (torch.utils.benchmark)")
    print(format_table([result]))
    for mode, m in result["modes"].items():
        for name, ratio in m.get("speedup_vs", {}).items():
            print(f"{mode}: moelab is {faster_or_slower(ratio)} than {name}")
    return 0
