"""Training throughput: moelab's ``mixtral`` model against transformers' MixtralForCausalLM.

    python benchmarks/train_throughput.py                       # 2 threads, fp32, CPU
    python benchmarks/train_throughput.py --blocks 12 --json train_throughput.json
    python benchmarks/train_throughput.py --no-eager            # skip the slow HF eager column
    python benchmarks/train_throughput.py --compile             # add ours with train.compile

One process trains, from the same random initial weights (ours, copied into transformers with
``moelab.interop.to_transformers``) and on the same random token batches:
- "ours": ``moelab.model.Transformer`` built from the ``mixtral`` preset (vocab 4096, d_model 256,
  4 layers, 4 heads / 2 KV heads, 8 experts top-2, expert hidden 512), the optimiser of
  ``moelab.train.optim.build_optimizer``;
- "hf_grouped_mm": MixtralForCausalLM with ``experts_implementation="grouped_mm"`` and SDPA
  attention (what ``to_transformers`` builds);
- "hf_eager" (unless ``--no-eager``): the same with the eager experts loop;
- "ours_compiled" (with ``--compile``): ours with ``train.compile`` (attention and norms under
  torch.compile, see ``moelab.train.compile``); compile time falls in the warm-up steps.

Every step does, on both sides, what ``moelab.train.trainer`` does per step at grad_accum=1:
forward on (B, T) tokens; loss = mean cross-entropy of all B*T positions against the next tokens
(ours: ``model(x, targets=y).loss``, the fused LM head + cross-entropy the trainer uses, see
``moelab.model.linear_cross_entropy``; HF: ``trainer.lm_loss`` on its logits, which is what HF's
own ``ForCausalLMLoss`` computes: float32 ``F.cross_entropy``) + the load-balancing aux loss times its
coefficient; backward; ``clip_grad_norm_(1.0)``; AdamW step (lr 3e-3, betas 0.9/0.95, weight decay
0.1 on matrices except the embedding); ``zero_grad(set_to_none=True)``; and the trainer's host
reads (finite-loss check, ``ce.item()``, ``aux.item()``, the grad norm as a float).
The aux losses are the same Switch loss with the same coefficient (the preset's 0.02, copied into
HF's ``router_aux_loss_coef``): ours is computed per MoE layer inside the forward from the routing
it already has (E * sum_i f_i P_i per layer, summed over layers); HF's ``load_balancing_loss_func``
(``output_router_logits=True``) re-derives softmax and top-k from every layer's router logits
after the forward and computes E * sum_i f_i P_i over all layers' tokens pooled. Ours also calls
``update_router_biases()`` (a no-op for this preset). HF's AdamW is ``torch.optim.AdamW`` with the
same groups, ``fused=True`` where torch supports it, which is what HF's Trainer uses by default
(``adamw_torch_fused`` on torch >= 2.8); ``--hf-optimizer`` picks another.

Timing: after ``--warmup`` untimed steps per model, ``--blocks`` rounds each run ``--steps`` steps
of every model, the order rotating per round, so a slow spell on a shared machine hits all of
them. A block's tokens/s is B*T*steps over its wall time; we report each model's median over
blocks and the median of the per-round ratios ours/HF. Benchmarks report; they never assert
speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from moelab.benchmarking import environment
from moelab.interop import to_transformers
from moelab.model.transformer import Transformer
from moelab.presets import load_preset
from moelab.train.compile import compile_dense_parts
from moelab.train.optim import build_optimizer
from moelab.train.evaluate import lm_loss


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # -> (ce, aux)
    after_step: Callable[[], None] = lambda: None


def ours_contender(model: Transformer, train_cfg, name: str = "ours") -> Contender:
    def loss(x, y):
        out = model(x, targets=y)                             # the trainer's fused LM head + loss
        return out.loss, out.aux_loss                          # aux: already coefficient-weighted
    return Contender(name, model, build_optimizer(model, train_cfg), loss, model.update_router_biases)


def hf_optimizer(model: torch.nn.Module, train_cfg, kind: str) -> torch.optim.Optimizer:
    """The grouping and hyperparameters of ``build_optimizer``, on HF parameter names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=1e-8, **options)


def hf_contender(ours: Transformer, experts_implementation: str, train_cfg, optimizer: str) -> Contender:
    hf = to_transformers(ours, "mixtral")                      # same weights, SDPA attention
    hf.set_experts_implementation(experts_implementation)
    hf.train()
    coef = hf.config.router_aux_loss_coef

    def loss(x, y):
        out = hf(input_ids=x, output_router_logits=True, use_cache=False)
        return lm_loss(out.logits, y), coef * out.aux_loss
    return Contender(f"hf_{experts_implementation}", hf, hf_optimizer(hf, train_cfg, optimizer), loss)


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor, clip: float) -> float:
    """One optimiser step as the trainer takes it (grad_accum=1), host reads included."""
    ce, aux = c.loss(x, y)
    loss = ce + aux
    if not torch.isfinite(loss):
        raise RuntimeError(f"{c.name}: non-finite loss {loss.item()}")
    loss.backward()
    ce_value, _ = ce.item(), aux.item()
    float(torch.nn.utils.clip_grad_norm_(c.model.parameters(), clip))
    c.optimizer.step()
    c.after_step()
    c.optimizer.zero_grad(set_to_none=True)
    return ce_value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8, help="timed rounds (each runs every model)")
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eager", action="store_true", help="skip HF's eager experts loop")
    p.add_argument("--compile", action="store_true", help="also time ours with train.compile")
    p.add_argument("--hf-optimizer", default="fused", choices=["fused", "foreach", "for-loop"],
                   help="AdamW implementation for HF (default: fused, HF Trainer's default)")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_preset("mixtral").with_overrides(
        {"train.batch_size": args.batch, "train.seq_len": args.seq}).validate()
    m = cfg.model
    torch.manual_seed(args.seed)
    ours = Transformer(m).train()
    contenders = [ours_contender(ours, cfg.train),
                  hf_contender(ours, "grouped_mm", cfg.train, args.hf_optimizer)]
    if not args.no_eager:
        contenders.append(hf_contender(ours, "eager", cfg.train, args.hf_optimizer))
    if args.compile:
        compiled = copy.deepcopy(ours)
        compile_dense_parts(compiled)
        contenders.append(ours_contender(compiled, cfg.train, "ours_compiled"))

    g = torch.Generator().manual_seed(args.seed)
    windows = [torch.randint(0, m.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    tokens_per_step = args.batch * args.seq
    env = environment()
    print(f"# {env['date']} torch {env['torch']} transformers {env['transformers']} "
          f"threads {env['threads']} {env['platform']}", flush=True)
    print(f"# vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.kv_heads} "
          f"heads, {m.moe.num_experts} experts top-{m.moe.top_k}, expert hidden {m.moe.expert_hidden}, "
          f"batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens/step", flush=True)

    first_loss = {}
    step_of = {c.name: 0 for c in contenders}

    def run(c: Contender, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            w = windows[step_of[c.name] % len(windows)]    # every model sees the same sequence
            ce = train_step(c, w[:, :-1], w[:, 1:], cfg.train.grad_clip)
            first_loss.setdefault(c.name, ce)
            step_of[c.name] += 1
        return time.perf_counter() - t0

    for c in contenders:
        run(c, args.warmup)
    print("# first-step cross-entropy (same weights and batch): "
          + ", ".join(f"{k} {v:.5f}" for k, v in first_loss.items()), flush=True)
    tps: dict[str, list[float]] = {c.name: [] for c in contenders}
    for b in range(args.blocks):
        order = contenders[b % len(contenders):] + contenders[:b % len(contenders)]
        for c in order:
            tps[c.name].append(tokens_per_step * args.steps / run(c, args.steps))
        print(f"block {b + 1}/{args.blocks}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in tps.items())
              + " tokens/s", flush=True)

    med = {k: statistics.median(v) for k, v in tps.items()}
    def per_round(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))
    vs_hf = {k: per_round(k, "hf_grouped_mm") for k in tps}
    print("\n| model | median tokens/s | / hf_grouped_mm (median of per-round ratios) |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {vs_hf[k]:.2f}x |")
    if args.json:
        result = {
            "ours_tokens_per_s": med["ours"],
            "hf_tokens_per_s": med["hf_grouped_mm"],
            "ratio": vs_hf["ours"],
            "ratio_of_medians": med["ours"] / med["hf_grouped_mm"],
            "hf_eager_tokens_per_s": med.get("hf_eager"),
            "ratio_vs_hf_eager": per_round("ours", "hf_eager") if "hf_eager" in tps else None,
            "ours_compiled_tokens_per_s": med.get("ours_compiled"),
            "ratio_per_model": vs_hf,
            "per_block_tokens_per_s": tps,
            "first_step_cross_entropy": first_loss,
            "optimizers": {c.name: _optimizer_kind(c.optimizer) for c in contenders},
            "settings": {**vars(args), "tokens_per_step": tokens_per_step, "model": cfg.to_dict()["model"]},
            "environment": env,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")


def _optimizer_kind(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop (torch default on CPU)"


if __name__ == "__main__":
    main()
