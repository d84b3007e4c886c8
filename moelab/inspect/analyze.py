"""``inspect_run``: open a run, route its held-out tokens once, measure, and return one JSON-ready
dict (what ``inspect.json`` holds). Drawing and writing are :mod:`moelab.inspect.report`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moelab.config import ConfigError
from moelab.inspect import ablation as A
from moelab.inspect import specialization as S
from moelab.inspect import widths as W
from moelab.inspect.coactivation import coactivation_ratio, strongest_pairs
from moelab.inspect.collect import Collected, collect
from moelab.inspect.errors import InspectError
from moelab.inspect.load import load_summary
from moelab.inspect.saturation import load_against, saturation
from moelab.inspect.source import TokenSource, open_source
from moelab.inspect.trace import trace_prompt

SPECIALIST_MIN_DELTA = 0.01
FORWARD_TOKENS = 4096

# stage name, total units -> a callable that advances by n units
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class InspectOptions:
    tokens: int = 65536                    # held-out tokens to route
    corpus: Optional[str] = None           # another corpus (default: the run's own)
    split: Optional[str] = None            # val | train | all (default: val, or all for --corpus)
    categories: str = "auto"               # auto | python | file | folder | field:NAME | none
    ablate: str = "all"                    # all | none | comma list of top[:N], bottom[:N], ids
    ablate_tokens: int = 8192              # tokens each ablation is scored on
    against: Optional[str] = None          # another checkpoint or run, for router saturation
    prompt: Optional[str] = None           # trace this text
    device: Optional[str] = None           # default: the run's train.device
    batch_size: Optional[int] = None       # windows per batch (default: ~4096 tokens)
    seq_len: Optional[int] = None          # tokens per window (default: the run's)
    overrides: tuple[str, ...] = ()        # data.* / train.* settings for reading the tokens

    def check(self) -> None:
        from moelab.config import MAX_BATCH, MAX_SEQ_LEN, MAX_TOKENS
        for name, value, high in (("--tokens", self.tokens, MAX_TOKENS), ("--ablate-tokens", self.ablate_tokens, MAX_TOKENS),
                                  ("--batch-size", self.batch_size, MAX_BATCH), ("--seq-len", self.seq_len, MAX_SEQ_LEN)):
            if value is not None and not 1 <= value <= high:
                raise InspectError(f"{name} = {value} is invalid: must be >= 1 and <= {high:,}")
        for o in self.overrides:
            if not o.split("=", 1)[0].strip().startswith(("data.", "train.")):
                raise InspectError(f"--set {o!r} is invalid here: inspect reads a trained model, so "
                                   "only data.* and train.* settings (how tokens are read) can change")


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def open_run(run_dir: str | Path, opts: InspectOptions):
    """(config, model) of a run folder with MoE layers, on the chosen device."""
    import torch

    from moelab.parallel.layout import pick_device
    from moelab.runfolder import CheckpointError, load, read_config
    try:
        cfg = read_config(run_dir)
        if opts.overrides:
            cfg = cfg.with_overrides(list(opts.overrides)).validate()
    except CheckpointError as e:
        raise InspectError(f"RUN: {e}") from None
    if not cfg.model.moe_layer_indices():
        raise InspectError(f"RUN {str(run_dir)!r} is a dense model (model.moe.layers = "
                           f"{cfg.model.moe.layers!r}, no MoE layer): inspect analyses expert "
                           "routing, so it needs a run with at least one MoE layer")
    _check_memory(cfg, opts)
    try:
        device = pick_device(opts.device or cfg.train.device)
        model = load(run_dir, device=device, dtype=torch.float32)
    except CheckpointError as e:
        raise InspectError(f"RUN: {e}") from None
    except (ConfigError, RuntimeError) as e:
        raise InspectError(f"--device {opts.device or cfg.train.device}: {e}") from None
    return cfg, model


def _check_memory(cfg, opts: InspectOptions) -> None:
    """Refuse, before reading a weight, a model the device cannot hold in float32 with the
    logits of one window."""
    from moelab.accounting import inference_bytes
    from moelab.resources import available_on, refuse_unless_fits
    device = opts.device or cfg.train.device
    seq = min(opts.seq_len or cfg.train.seq_len, cfg.model.max_seq_len)
    try:
        refuse_unless_fits(inference_bytes(cfg.model, 4, 1, seq), available_on("cpu" if device == "auto" else device),
                           "inspecting this model (float32)", device, "inspect it on a machine with more memory")
    except ConfigError as e:
        raise InspectError(str(e)) from None


def inspect_run(run_dir: str | Path, opts: InspectOptions = InspectOptions(), *,
                progress: Progress = _no_progress, log: Callable[[str], None] = lambda m: None) -> dict:
    """Everything ``moelab inspect`` measures, as the dict written to inspect.json."""
    opts.check()
    cfg, model = open_run(run_dir, opts)
    items = A.parse_selection(opts.ablate)
    against = load_against(opts.against, model) if opts.against else None
    source = open_source(run_dir, cfg, max_tokens=opts.tokens, corpus=opts.corpus, split=opts.split,
                         categories=opts.categories, log=log)
    if source.num_tokens < 1:
        raise InspectError(f"{source.description} has no tokens to route")
    seq = opts.seq_len or min(cfg.train.seq_len, cfg.model.max_seq_len)
    if seq > cfg.model.max_seq_len:
        raise InspectError(f"--seq-len = {seq} is invalid: the model's context is {cfg.model.max_seq_len}")
    # inference keeps no activations for backward: batches of ~FORWARD_TOKENS amortise the
    # per-call overheads (kernel launches, Python) that dominate at training batch sizes
    batch = opts.batch_size or max(cfg.train.batch_size, FORWARD_TOKENS // seq)
    n = min(opts.tokens, source.num_tokens)
    if n < opts.tokens:
        log(f"inspect: {source.description} has {source.num_tokens:,} tokens; routing all of them "
            f"(--tokens asked for {opts.tokens:,})")

    # the prompt is checked (and traced) before the long pass, so a bad one fails fast
    trace = trace_prompt(model, source.tokenizer, opts.prompt).to_dict() if opts.prompt else None
    names = source.category_names
    got = collect(model, source.batches(n, seq, batch), num_categories=len(names), against=against,
                  on_tokens=progress("routing", n))
    layers = [_layer_result(got, i, names, source) for i in range(len(got.layers))]
    active_measured = None
    if W.needs_measured_active(cfg):
        active_measured = W.measured_active_section(
            cfg, {lc.layer: lc.kept_E.tolist() for lc in got.layers}, got.tokens, seq)
    if cfg.model.moe.heterogeneous:
        for lr, lc in zip(layers, got.layers):
            lr["widths"] = W.width_section(cfg.model.moe.expert_widths(lc.num_experts), lc.cat_CE.numpy(),
                                           lc.kept_E.numpy(), names)

    ablation = None
    if items is not None:
        abl_batches = list(source.batches(min(opts.ablate_tokens, n), seq, batch))
        plan = [A.select_experts(items, lr["tokens_per_expert"]) for lr in layers]
        step = progress("ablation", sum(len(p) for p in plan))
        base, deltas = A.ablation_deltas(model, abl_batches, plan, on_run=lambda: step(1))
        for lr, d in zip(layers, deltas):
            lr["ablation_delta_loss"] = [d.get(e) for e in range(lr["num_experts"])]
            lr["specialists"] = _specialists(lr)
        ablation = {"spec": opts.ablate, "tokens": sum(b.x_BT.numel() for b in abl_batches),
                    "base_loss": base}
    else:
        for lr in layers:
            lr["ablation_delta_loss"] = [None] * lr["num_experts"]     # every expert skipped
            lr["specialists"] = []

    return _finite({
        "run": str(run_dir),
        "corpus": source.description,
        "tokens": got.tokens,
        "top_k": got.top_k,
        "num_layers": cfg.model.n_layers,
        "moe_layers": [lc.layer for lc in got.layers],
        "loss": got.loss,
        "active_measured": active_measured,
        "window": {"seq_len": seq, "batch_size": batch},
        "categories": {"kind": source.category_kind, "names": list(names),
                       "tokens": got.cat_tokens_C.tolist() if names else []},
        "ablation": ablation,
        "against": str(opts.against) if opts.against else None,
        "layers": layers,
        "trace": trace,
    })


def _layer_result(got: Collected, i: int, names: tuple[str, ...], source: TokenSource) -> dict:
    lc = got.layers[i]
    E, K, N = lc.num_experts, got.top_k, got.tokens
    out = {"layer": lc.layer, "num_experts": E}
    out.update(load_summary(lc.kept_E.numpy(), N, K))
    out["entropy"] = lc.entropy_sum / max(N, 1)
    out["dropped_fraction"] = lc.dropped_sum / max(N, 1)

    coact = lc.coact_EE.numpy()
    ratio = coactivation_ratio(coact)
    out["coactivation"] = coact.tolist()
    out["coactivation_ratio"] = np.round(ratio, 6).tolist()
    out["strongest_pairs"] = [{"experts": [a, b], "ratio": r} for a, b, r in strongest_pairs(ratio)]
    if lc.next_EF is not None:
        out["next_layer"] = got.layers[i + 1].layer
        out["transition"] = lc.next_EF.numpy().tolist()
    else:
        out["next_layer"], out["transition"] = None, None

    vocab = S.vocab_specialization(lc.top1)
    out["vocab_specialization"] = vocab.mean
    out["vocab_specialization_chance"] = vocab.chance
    out["vocab_ids"] = vocab.num_ids
    lifts = S.top_lift_tokens(lc.topk, vocab, lc.chosen_E.numpy(), N)
    out["top_tokens"] = [[{"token": source.tokenizer.decode([t]), "id": t, "lift": round(l, 4), "count": c}
                          for t, l, c in per_expert] for per_expert in lifts]

    out["category_uniform"] = K / E
    if names:
        counts = got.cat_tokens_C
        share = S.category_share(lc.cat_CE.numpy(), counts)
        present = [c for c in range(len(names)) if counts[c] > 0]
        out["category_share"] = {names[c]: np.round(share[c], 6).tolist() for c in present}
        test = S.category_test(got.sample_cats, got.sample_ids(i), len(names), E)
        out.update({"category_mi_bits": test.mi_bits, "category_mi_fraction": test.fraction,
                    "category_mi_chance_bits": test.chance_bits,
                    "category_mi_chance_std_bits": test.chance_std_bits,
                    "category_mi_ratio": test.ratio, "category_mi_z": test.z,
                    "category_mi_sample_tokens": test.sample_tokens,
                    "category_specialised": test.specialised})
        best = S.strongest_category(share, counts, names, K / E)
        out["strongest_category"] = None if best is None else \
            {"category": best[0], "expert": best[1], "share": best[2], "vs_uniform": best[3]}
    else:
        out["category_share"] = {}
        out["category_specialised"] = None
        out["strongest_category"] = None
    if got.against:
        out["saturation_top1"], out["saturation_topk"] = saturation(
            lc.saturation_top1, lc.saturation_overlap, N, K)
    return out


def _specialists(layer: dict) -> list[int]:
    """Experts with little traffic but a large loss increase: below their fair share of tokens
    (normalised load < 1) yet costing at least twice the layer's median ablation loss and at
    least SPECIALIST_MIN_DELTA nats."""
    deltas = [(e, d) for e, d in enumerate(layer["ablation_delta_loss"]) if d is not None]
    if len(deltas) < 3:
        return []
    median = float(np.median([d for _, d in deltas]))
    return [e for e, d in deltas
            if d >= max(2 * median, SPECIALIST_MIN_DELTA) and layer["normalized_load"][e] < 1.0]


def _finite(obj):
    """The same structure with NaN and infinities as None, so inspect.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _finite(obj.item())
    return obj
