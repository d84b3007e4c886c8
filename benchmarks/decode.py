"""Decode speed: moelab's generation against Hugging Face ``generate`` on the same weights.

For each model and batch size, one random-weight moelab model is built from a preset, copied into
the matching ``transformers`` model (``moelab.interop.hf.to_transformers``: ``mixtral`` ->
MixtralForCausalLM, ``dense`` -> LlamaForCausalLM), and both generate greedily from the same random
prompts in float32. The tokens must agree; then both are timed, interleaved, and the median of
the repeats is reported as new tokens per second (all rows, prefill included), with the ratio.
"ours" is ``moelab.generate(..., compile=True)`` (the decode step under torch.compile; compile
time is spent in the warm-up run and not counted), "eager" the same without compile, and
"forward loop" a plain loop over ``Transformer.forward(tokens, cache)``, the path that the lean
decode in ``moelab.generate`` replaces. "floor" is the time of only the matmuls a step cannot avoid
(``matmul_floor_ms``), and "max ratio" HF's step time over it: no decoder of these weights, at
this precision, can beat HF by more, so it says how much of a ratio target the machine allows.

    python benchmarks/decode.py                                   # mixtral, batch 1
    python benchmarks/decode.py --model mixtral dense --batch 1 8 --json decode.json

Reports numbers only; it never asserts a speed. Exit status 1 when the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import moelab
from moelab.generate import generate

FAMILY = {"mixtral": "mixtral", "dense": "llama"}


def ours_tokens(model, prompts_BT: torch.Tensor, new: int, compile: bool) -> torch.Tensor:
    out = generate(model, prompts_BT, max_new_tokens=new, temperature=0, compile=compile)
    return torch.tensor(out.tokens)                                    # (B, new)


@torch.inference_mode()
def forward_loop_tokens(model, prompts_BT: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding through ``Transformer.forward`` with a cache: the unoptimised reference."""
    B, T = prompts_BT.shape
    cache = model.new_cache(B, T + new)
    next_B = model(prompts_BT, cache).logits[:, -1].argmax(-1)
    out = [next_B]
    for _ in range(new - 1):
        next_B = model(next_B[:, None], cache).logits[:, -1].argmax(-1)
        out.append(next_B)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def hf_tokens(hf_model, prompts_BT: torch.Tensor, new: int) -> torch.Tensor:
    out = hf_model.generate(prompts_BT, attention_mask=torch.ones_like(prompts_BT),
                            max_new_tokens=new, do_sample=False)
    return out[:, prompts_BT.shape[1]:]


@torch.inference_mode()
def matmul_floor_ms(model, batch: int, repeats: int = 50) -> float:
    """Milliseconds per step of only the matmuls a decode step cannot avoid: every attention,
    dense-FFN and LM-head weight, the router and, per MoE layer, top_k experts (the distinct
    experts a batch of ``batch`` tokens reaches, at most top_k * batch, taken as the first ones),
    each as one ``F.linear`` on ``batch`` rows. Any decoder of these weights, ours or Hugging
    Face's, spends at least this; HF's time over it bounds the ratio a faster decoder can reach."""
    import torch.nn.functional as F
    weights = []
    for block in model.blocks:
        weights += [block.attn.qkv.weight, block.attn.out.weight]
        if block.is_moe:
            moe = block.ffn
            reached = min(moe.num_experts, moe.cfg.top_k * batch)
            weights.append(moe.router.gate)
            for e in range(reached):
                weights += [moe.experts.w_gate_up[e], moe.experts.w_down[e]]
        else:
            weights += [block.ffn.gate_up.weight, block.ffn.down.weight]
    weights.append(model.lm_weight)
    xs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]

    def step():
        for x, w in zip(xs, weights):
            F.linear(x, w)
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def run_one(preset: str, batch: int, prompt_len: int, new: int, repeats: int, seed: int) -> dict:
    from moelab.interop.hf import to_transformers
    torch.manual_seed(seed)
    model = moelab.build(preset).eval()
    hf_model = to_transformers(model, FAMILY[preset])
    hf_model.generation_config.eos_token_id = None     # run all `new` tokens, like ours
    hf_model.generation_config.pad_token_id = 0
    prompts_BT = torch.randint(0, model.config.vocab_size, (batch, prompt_len))

    runners = {"ours": ours_tokens, "eager": ours_tokens, "hf": lambda *a: hf_tokens(hf_model, *a),
               "forward_loop": forward_loop_tokens}
    args = {"ours": (model, prompts_BT, new, True), "eager": (model, prompts_BT, new, False),
            "hf": (prompts_BT, new), "forward_loop": (model, prompts_BT, new)}
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    tokens = {}
    for name, fn in runners.items():                   # warm-up (first-call allocations)
        tokens[name] = fn(*args[name])
    for _ in range(repeats):                           # interleaved, so load drifts hit all alike
        for name, fn in runners.items():
            dt, tokens[name] = timed(fn, *args[name])
            seconds[name].append(dt)
    same = all(torch.equal(tokens["hf"], t) for t in tokens.values())
    mismatch = None
    if not same:
        diff = (tokens["ours"] != tokens["hf"]).any(dim=0).nonzero()
        mismatch = int(diff[0]) if len(diff) else None
    tps = {k: batch * new / statistics.median(v) for k, v in seconds.items()}
    floor = matmul_floor_ms(model, batch)
    hf_ms = 1e3 * statistics.median(seconds["hf"]) / new
    return {
        "model": preset, "hf_class": type(hf_model).__name__, "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new, "repeats": repeats,
        "ours_tokens_per_s": round(tps["ours"], 1),
        "hf_tokens_per_s": round(tps["hf"], 1),
        "ours_eager_tokens_per_s": round(tps["eager"], 1),
        "forward_loop_tokens_per_s": round(tps["forward_loop"], 1),
        "ratio": round(tps["ours"] / tps["hf"], 2),
        "ratio_eager": round(tps["eager"] / tps["hf"], 2),
        "ours_ms_per_step": round(1e3 * statistics.median(seconds["ours"]) / new, 3),
        "hf_ms_per_step": round(hf_ms, 3),
        "matmul_floor_ms_per_step": round(floor, 3),
        "max_ratio_at_floor": round(hf_ms / floor, 2),
        "same_tokens": same, "first_mismatch": mismatch,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["mixtral"], choices=sorted(FAMILY))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                      f"load average {os.getloadavg()[0]:.1f} at start",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "command": "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{env['date']}  torch {env['torch']}  transformers {env['transformers']}  "
          f"{env['machine']}")
    header = f"{'model':<8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} " \
             f"{'eager tok/s':>12} {'ratio':>6} {'forward loop':>13} {'ours ms/step':>13} " \
             f"{'floor ms':>9} {'max ratio':>9}  same tokens"
    print(header)
    runs = []
    for preset in args.model:
        for batch in args.batch:
            r = run_one(preset, batch, args.prompt_len, args.new_tokens, args.repeats, args.seed)
            runs.append(r)
            same = "yes" if r["same_tokens"] else f"NO (first at step {r['first_mismatch']})"
            print(f"{preset:<8} {batch:>5} {r['ours_tokens_per_s']:>11.1f} {r['hf_tokens_per_s']:>9.1f} "
                  f"{r['ratio']:>5.2f}x {r['ours_eager_tokens_per_s']:>12.1f} {r['ratio_eager']:>5.2f}x "
                  f"{r['forward_loop_tokens_per_s']:>13.1f} "
                  f"{r['ours_ms_per_step']:>13.3f} {r['matmul_floor_ms_per_step']:>9.3f} "
                  f"{r['max_ratio_at_floor']:>8.2f}x  {same}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**runs[0], **env, "runs": runs}, f, indent=2)
    return 0 if all(r["same_tokens"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
