"""Batch-1 decode of a real-sized MoE model against the memory-bandwidth limit.

Decoding one token reads every active weight once and does two flops per weight, so on CPU (and
in HBM on GPU) its speed limit is the memory bandwidth over the bytes of active weights per token.
This benchmark builds, with random weights and straight into bf16 (``moelab.quantize.build``):

- an OLMoE-shaped MoE (OLMoE-1B-7B, Muennighoff et al. 2024: 64 experts, top-8, q/k norms over
  the whole projection, MHA, 50304-token vocabulary) scaled to about 1B total and 0.2B active
  parameters: 16 layers, width 1024, 16 heads, expert hidden 256 (``--size full``, the default);
- its dense counterpart with the same active parameters (a SwiGLU of width top_k x expert hidden);
- for the experts-scaling check, 4-layer models of the MoE's shape with E and 4E experts (same
  active parameters): batch-1 decode must read only the chosen experts, so both should run at the
  same tokens/s;

and measures, in one run, interleaved so that load drifts hit every variant alike:

- the memory bandwidth: a STREAM-like copy with torch (``b.copy_(a)`` over 2 x 256 MiB, bytes =
  read + write, as STREAM counts them), the median of measurements taken between the decode runs;
- batch-1 greedy decode tokens/s of moelab in bf16 and in int8 weight-only (``quantize="int8"``),
  of Hugging Face ``generate`` on the same weights in bf16 (copied by ``moelab.interop.hf.
  to_transformers``), and of llama.cpp (``llama-cpp-python``) on the same weights exported to GGUF
  by moelab's exporter (``moelab.interop.gguf``, the product's ``moelab convert --to-gguf``) at
  bf16 (and Q8_0 beside int8) and run by moelab's llama.cpp engine (``moelab.interop.llamacpp``,
  the product's ``moelab generate --engine llama.cpp``), when the gguf extra is installed;
- the bandwidth limit: bandwidth / bf16 bytes of the weights one token reads (all attention and
  norm weights, the router, top-k experts, the LM head and one embedding row; the KV cache is left
  out, at these context lengths it is under 1% of the bytes), and every speed as a fraction of it.

Decode tokens/s excludes the prompt: time(new tokens) - time(1 token), over new - 1 tokens.

    python benchmarks/decode_bandwidth.py --json decode_bandwidth.json           # ~1B model
    python benchmarks/decode_bandwidth.py --size quick                           # a minute

Reports numbers only; it never asserts a speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _cpu_name  # noqa: E402

import moelab  # noqa: E402
from moelab.accounting import param_counts  # noqa: E402
from moelab.generate import generate  # noqa: E402
from moelab.model.weights import build_on_meta, materialize  # noqa: E402
from moelab.quantize import prepare, weight_bytes  # noqa: E402

SIZES = {
    # OLMoE-1B-7B is 16 layers x 2048, 64 experts of hidden 1024, top-8: 6.9B total, 1.3B active
    "full": dict(n_layers=16, d_model=1024, n_heads=16, vocab_size=50304, experts=64, top_k=8,
                 expert_hidden=256, scaling_layers=4),
    "quick": dict(n_layers=4, d_model=512, n_heads=8, vocab_size=8192, experts=64, top_k=8,
                  expert_hidden=128, scaling_layers=2),
}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def moe_config(s: dict, layers: Optional[int] = None, experts: Optional[int] = None):
    overrides = [f"model.n_layers={layers or s['n_layers']}", f"model.d_model={s['d_model']}",
                 f"model.n_heads={s['n_heads']}", f"model.n_kv_heads={s['n_heads']}",
                 f"model.vocab_size={s['vocab_size']}",
                 "model.qk_norm=full", "model.max_seq_len=1024", "model.rope_theta=10000.0",
                 f"model.moe.num_experts={experts or s['experts']}", f"model.moe.top_k={s['top_k']}",
                 f"model.moe.expert_hidden={s['expert_hidden']}", "model.moe.renormalize=false"]
    return moelab.resolve_config("mixtral", overrides).model


def dense_config(s: dict):
    """The MoE's dense twin, Llama-shaped: one SwiGLU of width top_k x expert hidden per layer
    (the same active parameters) and no q/k norms (Llama has none; they are 0.2% of the bytes)."""
    moe = moe_config(s)
    return dataclasses.replace(moe, ffn_hidden=s["top_k"] * s["expert_hidden"], qk_norm="none",
                               moe=dataclasses.replace(moe.moe, layers="none"))


def read_params(cfg) -> int:
    """Parameters one decoded token reads: the active ones, with one embedding row instead of the
    whole table (unless the LM head is the embedding)."""
    counts = param_counts(cfg)
    return counts["active"] if cfg.tie_embeddings else counts["active"] - counts["embedding"] + cfg.d_model


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 3) -> float:
    """STREAM "copy" bytes/s (read + write) of ``b.copy_(a)``, best of a few (one measurement)."""
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


@dataclasses.dataclass
class Runner:
    """One decoder: ``run(n)`` greedily generates n tokens and returns them."""
    name: str
    run: Callable[[int], list[int]]
    seconds_per_token: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)

    def measure(self, new: int, device: torch.device) -> None:
        sync(device)
        start = time.perf_counter()
        self.run(1)
        sync(device)
        mid = time.perf_counter()
        self.tokens = self.run(new)
        sync(device)
        end = time.perf_counter()
        self.seconds_per_token.append(max((end - mid) - (mid - start), 1e-9) / (new - 1))

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / statistics.median(self.seconds_per_token)


def ours(model, prompt_1T: torch.Tensor, compile: bool) -> Callable[[int], list[int]]:
    return lambda n: generate(model, prompt_1T, max_new_tokens=n, temperature=0, compile=compile).tokens[0]


def hf(hf_model, prompt_1T: torch.Tensor) -> Callable[[int], list[int]]:
    @torch.inference_mode()
    def run(n: int) -> list[int]:
        out = hf_model.generate(prompt_1T, attention_mask=torch.ones_like(prompt_1T), max_new_tokens=n,
                                do_sample=False)
        return out[0, prompt_1T.shape[1]:].tolist()
    return run


def interleave(runners: list[Runner], new: int, repeats: int, device: torch.device,
               bandwidth: list[float]) -> None:
    """Warm up every runner, then measure them in turn, ``repeats`` rounds, with a bandwidth
    measurement in each round."""
    for r in runners:
        r.run(2)
        r.run(new)
    for _ in range(repeats):
        bandwidth.append(copy_bandwidth(device))
        for r in runners:
            r.measure(new, device)


def first_mismatch(a: list[int], b: list[int]) -> Optional[int]:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# ---------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python, on the same weights exported to GGUF
# ---------------------------------------------------------------------------------------------

def llamacpp_available() -> Optional[str]:
    """None when llama-cpp-python and gguf import, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a built library that fails to load
        return f"{type(e).__name__}: {e}"
    return None


def llamacpp(model, path: Path, kind: str, prompt: list[int], threads: int):
    """Export ``model`` with the product's exporter (``moelab.interop.gguf.export_gguf``: "olmoe"
    for this shape; bf16 keeps the weights bit for bit, q8_0 is gguf's Q8_0, norms and router stay
    float32) and open it in the product's engine (``moelab.interop.llamacpp.LlamaCpp``); returns a
    Runner function (greedy arg-max decoding) and the engine to close."""
    from moelab.interop.gguf import export_gguf
    from moelab.interop.llamacpp import LlamaCpp
    export_gguf(model, path, type=kind)
    engine = LlamaCpp(path, 512, threads=threads, n_batch=64)
    return (lambda n: engine.greedy(prompt, n)), engine


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def measure_model(cfg, family: str, args, device, bandwidth: list[float], notes: list[str],
                  with_llamacpp: bool) -> dict:
    """Ours bf16 and int8, HF bf16 and llama.cpp (MoE only) on one model; returns its results."""
    torch.manual_seed(args.seed)
    model = materialize(build_on_meta(cfg), device, torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    read = read_params(cfg)
    result = {"total_params": param_counts(cfg)["total"], "active_params": param_counts(cfg)["active"],
              "read_params_per_token": read, "bf16_active_bytes_per_token": 2 * read,
              "bf16_weight_bytes": weight_bytes(model)}
    runners = [Runner("ours_bf16", ours(model, prompt, args.compile))]
    if not args.skip_hf:
        from moelab.interop.hf import to_transformers
        hf_model = to_transformers(model, family)
        hf_model.generation_config.eos_token_id = None
        hf_model.generation_config.pad_token_id = 0
        result["hf_class"] = type(hf_model).__name__
        runners.append(Runner("hf_bf16", hf(hf_model, prompt)))
    print(f"  ours bf16 vs HF bf16 ({len(runners)} decoders) ...", flush=True)
    interleave(runners, args.new_tokens, args.repeats, device, bandwidth)
    if not args.skip_hf:
        del hf_model, runners[1].run
        gc.collect()
    bf16 = runners[0]

    int8_model = prepare(copy.deepcopy(model), quantize="int8")
    result["int8_weight_bytes"] = weight_bytes(int8_model)
    int8 = Runner("ours_int8", ours(int8_model, prompt, args.compile))
    print("  ours bf16 vs ours int8 ...", flush=True)
    interleave([bf16, int8], args.new_tokens, args.repeats, device, bandwidth)
    del int8.run, int8_model
    gc.collect()
    runners.insert(1, int8)

    if with_llamacpp:
        with tempfile.TemporaryDirectory(prefix="moelab-gguf-") as tmp:
            for kind, name in (("bf16", "llamacpp_bf16"), ("q8_0", "llamacpp_q8_0")):
                path = Path(tmp) / f"model-{kind}.gguf"
                run, engine = llamacpp(model, path, kind, prompt[0].tolist(), torch.get_num_threads())
                lc = Runner(name, run)
                print(f"  ours bf16 vs llama.cpp {kind} ...", flush=True)
                interleave([bf16, lc], args.new_tokens, args.repeats, device, bandwidth)
                engine.close()
                del run, engine
                path.unlink()
                runners.append(lc)
    for r in runners:
        result[f"{r.name}_tokens_per_s"] = round(r.tokens_per_s, 3)
    result["tokens"] = {r.name: r.tokens for r in runners}
    result["first_mismatch_vs_ours_bf16"] = {r.name: first_mismatch(bf16.tokens, r.tokens)
                                             for r in runners[1:]}
    del model, runners, bf16
    gc.collect()
    return result


def experts_scaling(s: dict, args, device, bandwidth: list[float]) -> dict:
    """Same active parameters, E and 4E experts, ``scaling_layers`` layers: batch-1 tokens/s."""
    runners, keep = [], []
    for mult in (1, 4):
        cfg = moe_config(s, layers=s["scaling_layers"], experts=mult * s["experts"])
        torch.manual_seed(args.seed)
        model = materialize(build_on_meta(cfg), device, torch.bfloat16).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
        runners.append(Runner(f"experts_{mult * s['experts']}", ours(model, prompt, args.compile)))
        keep.append((cfg, model))
    print(f"  {s['experts']} vs {4 * s['experts']} experts ...", flush=True)
    interleave(runners, args.new_tokens, args.repeats, device, bandwidth)
    (cfg1, _), (cfg4, _) = keep
    out = {"layers": s["scaling_layers"], "experts": [s["experts"], 4 * s["experts"]],
           "total_params": [param_counts(cfg1)["total"], param_counts(cfg4)["total"]],
           "active_params": [param_counts(cfg1)["active"], param_counts(cfg4)["active"]],
           "tokens_per_s": [round(r.tokens_per_s, 3) for r in runners]}
    out["ratio_4x_over_1x"] = round(runners[1].tokens_per_s / runners[0].tokens_per_s, 3)
    del keep, runners
    gc.collect()
    return out


def summarise(r: dict, bw: float) -> None:
    limit = bw / r["bf16_active_bytes_per_token"]
    r["bandwidth_limit_tokens_per_s"] = round(limit, 3)
    for key in [k for k in r if k.endswith("_tokens_per_s") and k != "bandwidth_limit_tokens_per_s"]:
        name = key.removesuffix("_tokens_per_s")
        r[f"{name}_fraction_of_limit"] = round(r[key] / limit, 3)
    if "ours_int8_tokens_per_s" in r:
        r["int8_over_bf16"] = round(r["ours_int8_tokens_per_s"] / r["ours_bf16_tokens_per_s"], 3)
    if "hf_bf16_tokens_per_s" in r:
        r["ours_bf16_over_hf_bf16"] = round(r["ours_bf16_tokens_per_s"] / r["hf_bf16_tokens_per_s"], 3)


def print_table(title: str, r: dict) -> None:
    print(f"\n{title}: {r['total_params'] / 1e9:.3f}B total, {r['active_params'] / 1e9:.3f}B active, "
          f"{r['bf16_active_bytes_per_token'] / 1e6:.0f} MB of bf16 weights read per token")
    print(f"  {'decoder':<16} {'tokens/s':>9} {'of limit':>9}")
    print(f"  {'bandwidth limit':<16} {r['bandwidth_limit_tokens_per_s']:>9.2f} {1:>9.2f}")
    for key in r:
        if key.endswith("_fraction_of_limit"):
            name = key.removesuffix("_fraction_of_limit")
            print(f"  {name:<16} {r[name + '_tokens_per_s']:>9.2f} {r[key]:>9.2f}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full: ~1B total / 0.2B active (default); quick: a small model, a minute")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", dest="compile", action="store_false",
                   help="run our decode step eagerly (default: torch.compile, as --compile)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    s = SIZES[args.size]
    why_not = None if not args.skip_llamacpp else "skipped (--skip-llamacpp)"
    if why_not is None:
        why_not = llamacpp_available()
    # torchao (imported by transformers too) registers enums that torch logs a deprecation about
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from moelab.quantize import torchao_primitives
        torchao_primitives()         # import it quietly now; transformers imports it too
    except Exception:  # noqa: BLE001 - the int8 rows then fail with the extra named
        pass
    import transformers
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
           "load_average_at_start": round(os.getloadavg()[0], 2),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "compile": args.compile, "size": args.size, "shape": s, "new_tokens": args.new_tokens,
           "prompt_len": args.prompt_len, "repeats": args.repeats,
           "command": "python benchmarks/decode_bandwidth.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{env['date']}  torch {env['torch']}  {env['machine']}  load {env['load_average_at_start']}")
    if why_not:
        print(f"llama.cpp: not run ({why_not})")
    notes: list[str] = []
    bandwidth: list[float] = []

    print("MoE model (OLMoE-shaped):", flush=True)
    moe = measure_model(moe_config(s), "olmoe", args, device, bandwidth, notes, why_not is None)
    dense = None
    if not args.skip_dense:
        print("dense counterpart (same active parameters):", flush=True)
        dense = measure_model(dense_config(s), "llama", args, device, bandwidth, notes, False)
    scaling = None if args.skip_scaling else experts_scaling(s, args, device, bandwidth)

    bw = statistics.median(bandwidth)
    for r in (moe, dense):
        if r is not None:
            summarise(r, bw)
    result = {
        **{k: v for k, v in moe.items() if k != "tokens"},
        "memory_bandwidth_bytes_per_s": round(bw),
        "memory_bandwidth_best_bytes_per_s": round(max(bandwidth)),
        "memory_bandwidth_samples": [round(b) for b in bandwidth],
        "bf16_fraction_of_limit": moe.get("ours_bf16_fraction_of_limit"),   # the name
        "llamacpp_tokens_per_s": moe.get("llamacpp_bf16_tokens_per_s"),
        "llamacpp_int8_tokens_per_s": moe.get("llamacpp_q8_0_tokens_per_s"),
        "llamacpp_note": why_not,
        "dense": None if dense is None else {k: v for k, v in dense.items() if k != "tokens"},
        "experts_scaling": scaling,
        "load_average_at_end": round(os.getloadavg()[0], 2),
        **env,
    }
    print(f"\nmemory bandwidth (STREAM copy, median of {len(bandwidth)}): {bw / 1e9:.2f} GB/s "
          f"(best {max(bandwidth) / 1e9:.2f})")
    print_table("MoE", moe)
    if dense is not None:
        print_table("dense counterpart", dense)
    if scaling is not None:
        print(f"\nexperts scaling ({scaling['layers']} layers, same active parameters): "
              f"{scaling['experts'][0]} experts {scaling['tokens_per_s'][0]:.2f} tok/s, "
              f"{scaling['experts'][1]} experts {scaling['tokens_per_s'][1]:.2f} tok/s, "
              f"ratio {scaling['ratio_4x_over_1x']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
