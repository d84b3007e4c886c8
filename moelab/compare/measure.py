"""Measurements on a unit's trained weights, after training: the validation loss batch by batch,
and inference speed and cache size.

Legend: B prompts in a batch, P prompt tokens, S cached positions, K experts per token.

Validation: the trainer logs the mean over its fixed validation batches; its spread over those
batches is what a single-seed study can judge gaps against (``stats``), so we score the saved
model on the same batches (same ``val_batches`` windows, eval mode) and keep every batch's loss.

Inference uses ``moelab.generate``'s ``prefill`` and ``decode_one`` over the model's own static
KV cache, eagerly (no torch.compile: compiling a MoE decode step at batch 8 would recompile per
routing), greedy, on the same prompts for every model: B = 8 windows of P = 64 validation tokens
(fewer for short contexts).
- ``prefill_tokens_per_s``: the 8 prompts in one forward into an empty cache, B*P / time;
- ``decode_tokens_per_s`` (batch 1) and ``decode_tokens_per_s_batch8``: ``NEW_TOKENS`` decode
  steps after an untimed prefill, B*steps / time;
- ``kv_cache_bytes_per_token``: the bytes of the cache buffers the model allocates, per slot, at
  the model's dtype (float32 here);
- ``weight_bytes_per_token_batch1`` / ``_batch8``: the weight bytes one decode step reads, per
  token: everything but the embedding table (one row per token) and the routed experts, plus the
  experts the step's tokens were actually sent to (counted from the routing of the timed steps).
  This is why a sparse model can decode faster than a dense one at batch 1 (it reads its active
  experts only) and lose that edge at batch 8 (eight tokens touch most experts).
Models of one seed are measured together, in ``ROUNDS`` rounds with the order rotating, after one
untimed warm-up round; each number is the median over rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from moelab.compare.plan import write_json
from moelab.progress import no_progress

PROMPTS = 8
PROMPT_TOKENS = 64
NEW_TOKENS = 64
ROUNDS = 5
MEASURE_DIR = "measurements"


def _path(out_dir: Path, unit: dict) -> Path:
    return out_dir / MEASURE_DIR / f"{unit['id']}.json"


def load_measurement(out_dir: Path, unit: dict) -> dict:
    path = _path(out_dir, unit)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _load(run_dir: str):
    from moelab import load
    from moelab.runfolder import read_config
    return load(run_dir), read_config(run_dir)


class ValTokens:
    """Validation token streams by (data config, vocabulary): the units of a compare share one."""

    def __init__(self):
        self._streams: dict = {}

    def __call__(self, cfg):
        from moelab.data import prepare_data
        key = (repr(cfg.data), cfg.model.vocab_size)
        if key not in self._streams:
            self._streams[key] = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda _m: None).val_tokens
        return self._streams[key]


@torch.no_grad()
def validation_batch_losses(model, cfg, val_tokens: ValTokens) -> Optional[list[float]]:
    """Loss on each of the trainer's validation batches; None for objectives we cannot replay
    (masked LM draws its masks at random)."""
    from moelab.data import val_batches
    if getattr(cfg.train, "objective", "clm") != "clm":
        return None
    t = cfg.train
    batches = val_batches(val_tokens(cfg), t.batch_size, t.seq_len, t.eval_batches)
    model.eval()
    return [model(x, targets=y).loss.item() for x, y in batches]


def _prompts(model, cfg, val_tokens: ValTokens) -> torch.Tensor:
    """(B, P) int64: B evenly spaced windows of the validation split, the same for every model
    with the same data and vocabulary."""
    from moelab.data import val_batches
    P = max(1, min(PROMPT_TOKENS, model.config.max_seq_len // 2))
    x, _ = val_batches(val_tokens(cfg), PROMPTS, P, 1)[0]
    return x


def kv_cache_bytes_per_token(model) -> int:
    cache = model.new_cache(1, model.config.max_seq_len)
    total = sum(b.numel() * b.element_size() for layer in cache.layers for b in layer.buffers())
    return total // model.config.max_seq_len


def _weight_bytes(model) -> tuple[int, list[int]]:
    """(bytes every decode step reads whatever the routing, bytes of one routed expert per MoE
    layer). The embedding table is left out (a step reads one row per token) unless it is tied
    to the output head, which reads all of it."""
    elem = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters())
    per_expert, routed = [], 0
    for moe in model.moe_layers():
        n = moe.experts.w_gate_up.numel() + moe.experts.w_down.numel()
        routed += n
        per_expert.append(n // moe.num_experts)
    embed = 0 if model.lm_head is None else model.embed.weight.numel()
    return (total - routed - embed) * elem, [n * elem for n in per_expert]


@torch.inference_mode()
def _prefill_rate(model, prompts_BT: torch.Tensor) -> float:
    from moelab.generate import prefill
    B, P = prompts_BT.shape
    if not getattr(model.config, "causal", True):
        start = time.perf_counter()
        model(prompts_BT)
        return B * P / (time.perf_counter() - start)
    cache = model.new_cache(B, P)
    start = time.perf_counter()
    prefill(model, prompts_BT, cache)
    return B * P / (time.perf_counter() - start)


@torch.inference_mode()
def _decode_rate(model, prompts_BT: torch.Tensor) -> tuple[float, list[float]]:
    """(tokens/s over greedy decode steps, mean distinct experts per step in each MoE layer)."""
    from moelab.generate import decode_one, prefill
    B, P = prompts_BT.shape
    steps = max(1, min(NEW_TOKENS, model.config.max_seq_len - P))
    cache = model.new_cache(B, P + steps)
    logits_BV, _ = prefill(model, prompts_BT, cache)
    next_B = logits_BV.argmax(-1)
    distinct = []
    start = time.perf_counter()
    for _ in range(steps):
        logits_BV, ids = decode_one(model, next_B, cache)                  # ids: (B, K) per MoE layer
        next_B = logits_BV.argmax(-1)
        distinct.append([int(torch.unique(ids_BK).numel()) for ids_BK in ids])
    seconds = time.perf_counter() - start
    per_layer = [statistics.mean(col) for col in zip(*distinct)] if distinct and distinct[0] else []
    return B * steps / seconds, per_layer


def _inference_once(model, prompts_BT: torch.Tensor) -> dict:
    row = {"prefill_tokens_per_s": _prefill_rate(model, prompts_BT)}
    if getattr(model.config, "causal", True):
        row["decode_tokens_per_s"], row["experts_batch1"] = _decode_rate(model, prompts_BT[:1])
        row["decode_tokens_per_s_batch8"], row["experts_batch8"] = _decode_rate(model, prompts_BT)
    return row


def _summarise(model, rows: list[dict], prompts_BT: torch.Tensor) -> dict:
    """Medians over rounds, plus cache size and weight bytes read per decoded token."""
    B, P = prompts_BT.shape
    out = {"prompts": B, "prompt_tokens": P, "rounds": len(rows),
           "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in rows)}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8"):
        out["rounds_" + key] = [r.get(key) for r in rows]          # for the one-seed speed verdict
    if not getattr(model.config, "causal", True):
        out.update(decode_tokens_per_s=None, decode_tokens_per_s_batch8=None,
                   kv_cache_bytes_per_token=None,
                   note="model.causal = false: an encoder has no KV cache and no token-by-token "
                        "decoding, so only the prefill (one bidirectional forward) is measured")
        return out
    fixed, per_expert = _weight_bytes(model)
    experts1 = [statistics.mean(c) for c in zip(*(r["experts_batch1"] for r in rows))] if per_expert else []
    experts8 = [statistics.mean(c) for c in zip(*(r["experts_batch8"] for r in rows))] if per_expert else []
    out.update(
        new_tokens=max(1, min(NEW_TOKENS, model.config.max_seq_len - P)),
        decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in rows),
        decode_tokens_per_s_batch8=statistics.median(r["decode_tokens_per_s_batch8"] for r in rows),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        weight_bytes_per_token_batch1=fixed + sum(n * e for n, e in zip(experts1, per_expert)),
        weight_bytes_per_token_batch8=(fixed + sum(n * e for n, e in zip(experts8, per_expert))) / B,
        experts_touched_batch8=experts8,
        experts_per_layer=[m.num_experts for m in model.moe_layers()],
    )
    return out


INSPECT_TOKENS = 16384


def inspect_units(out_dir: Path, units: list[dict], log: Callable[[str], None] = print,
                  progress=no_progress) -> None:
    """``moelab inspect``'s summary (load, dead experts, strongest specialisation) of each sparse
    model's first-seed run: one pass over INSPECT_TOKENS held-out tokens, no ablation."""
    from moelab.inspect import InspectError, summary
    first = {}
    for u in units:
        first.setdefault(u["model"], u)
    for unit in first.values():
        rec = load_measurement(out_dir, unit)
        if "inspect" in rec:
            continue
        progress(f"inspecting {unit['id']}: reading its held-out tokens", None)   # until routing starts
        try:
            rec["inspect"] = summary(unit["run_dir"], tokens=INSPECT_TOKENS, progress=progress)
        except InspectError:                       # a dense model: nothing routed
            rec["inspect"] = None
        else:
            log(f"inspected the routing of {unit['id']}")
        write_json(_path(out_dir, unit), rec)


def measure_units(out_dir: Path, units: list[dict], inference_units: list[dict],
                  log: Callable[[str], None] = print, progress=no_progress) -> None:
    """Fill ``DIR/measurements/<unit>.json`` for every unit (validation losses per batch) and, for
    ``inference_units``, the inference numbers; units measured before are not measured again."""
    val_tokens = ValTokens()
    todo = [u for u in units if "val_batch_losses" not in load_measurement(out_dir, u)]
    if todo:
        log(f"scoring {len(todo)} trained model(s) batch by batch on the validation set")
    advance = progress("scoring trained models", len(todo))     # moelab.progress: bars / lines
    for unit in todo:
        model, cfg = _load(unit["run_dir"])
        losses = validation_batch_losses(model, cfg, val_tokens)
        rec = load_measurement(out_dir, unit)
        rec["val_batch_losses"] = losses
        write_json(_path(out_dir, unit), rec)
        advance(1)
    inspect_units(out_dir, inference_units, log, progress)
    pending = [u for u in inference_units if "inference" not in load_measurement(out_dir, u)]
    by_seed: dict = {}
    for u in pending:
        by_seed.setdefault(u["seed"], []).append(u)
    if pending:
        log(f"measuring inference of {len(pending)} trained model(s): prefill, decode at batch 1 and 8, "
            f"{ROUNDS} interleaved rounds")
    advance = progress("timing inference", sum((ROUNDS + 1) * len(g) for g in by_seed.values()))
    for seed, group in by_seed.items():
        loaded = [(u, *_load(u["run_dir"])) for u in group]
        prompts = [_prompts(m, c, val_tokens) for _, m, c in loaded]
        rows: list[list[dict]] = [[] for _ in loaded]
        for r in range(ROUNDS + 1):                       # round 0 warms up and is dropped
            order = list(range(len(loaded)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                row = _inference_once(loaded[i][1], prompts[i])
                advance(1)
                if r:
                    rows[i].append(row)
        for (unit, model, _), unit_rows, p in zip(loaded, rows, prompts):
            rec = load_measurement(out_dir, unit)
            rec["inference"] = _summarise(model, unit_rows, p)
            write_json(_path(out_dir, unit), rec)
