"""The "what this run shows" sentences and the scaling section, computed from the numbers only:
every verdict comes from ``stats.judge`` and quotes the numbers it rests on."""

from __future__ import annotations

from typing import Optional

from moelab.compare import stats
from moelab.compare.analysis import (
    SPIKE_RATIO, SPIKE_WINDOW, Comparison, ModelSummary, Study, speed_verdict,
)
from moelab.compare.plan import parse_budget
from moelab.compare.scaling import MIN_POINTS, crossover, fit_power_law

TRAIN_FLOPS_PER_FORWARD = 3      # forward + backward (twice the forward) per training token


def _pm(mean: Optional[float], sd: Optional[float], fmt: str = "{:.4f}") -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if sd is None else " ± " + fmt.format(sd))


def budget_words(text: str) -> str:
    """'250k' -> '250,000 tokens'; '10m' -> '600 s of training'."""
    return parse_budget(text).describe()


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:.2f} MiB"


def _verdict_words(c: Comparison) -> str:
    v = c.verdict
    if v.basis == "none":
        return (f"gap {v.gap:+.4f} nats; no verdict: with one seed and no per-batch losses there "
                f"is no noise estimate")
    samples = ("seeds" if v.basis == "seeds" else "validation batches")
    gaps = ", ".join(f"{g:+.4f}" for g in c.gaps) if v.basis == "seeds" else f"{v.n} batch gaps"
    t = v.threshold / v.se if v.se else float("nan")
    return (f"mean gap {v.gap:+.4f} nats over {v.n} {samples} ({gaps}), SE {v.se:.4f}, threshold "
            f"t({v.n - 1}) x SE = {t:.2f} x {v.se:.4f} = {v.threshold:.4f}: **{v.verdict}**")


def noise_lines(study: Study, comps: list[Comparison]) -> list[str]:
    warn = []
    if study.mismatches:
        warn = [f"Warning: re-scoring the saved models on the trainer's validation batches did not "
                f"reproduce the logged validation loss for {', '.join(study.mismatches)}; the batch "
                f"standard errors may not describe the logged numbers."]
    return warn + _noise_lines(study, comps)


def _noise_lines(study: Study, comps: list[Comparison]) -> list[str]:
    n = len(study.seeds)
    if n >= 2:
        t = stats.t_critical(n - 1)
        head = [c for c in comps if c.budget == study.headline and c.measure == "val_loss"]
        spread = [c.verdict.threshold for c in head if c.verdict.threshold is not None]
        lines = [f"Noise: {n} seeds ({', '.join(map(str, study.seeds))}), the same for every model "
                 f"(initial weights and batch order). Verdicts follow one rule: {stats.rule_text()}. "
                 f"With {n} seeds t = {t:.2f}."]
        if spread:
            lines.append(f"At {budget_words(study.headline)} a gap had to exceed "
                         f"{min(spread):.4f}-{max(spread):.4f} nats (t x SE of the paired seed gaps, per "
                         f"model) to be called; smaller gaps cannot be told from seed noise here, and "
                         f"more seeds shrink both t and the SE.")
        return lines
    ses = [m.mean("val_loss_batch_se") for m in study.at()]
    ses = [s for s in ses if s is not None]
    return [f"Noise: one seed ({study.seeds[0]}), so there is **no estimate of seed-to-seed noise**: "
            f"a gap between two trainings can come from the seed alone (run --seeds 2 or more). "
            f"The validation loss's own standard error over its batches is "
            + (f"{min(ses):.4f}-{max(ses):.4f} nats" if ses else "not available")
            + "; verdicts below judge gaps against that evaluation noise only (paired over the "
              "same validation batches), a lower bound on the real uncertainty. Rule: "
            + stats.rule_text() + "."]


def _claim(match: str) -> str:
    return {"active": "MoE beats dense at equal active parameters (equal compute per token)",
            "total": "at equal total parameters MoE matches dense with less compute per token",
            "both": "MoE beats dense at equal active parameters (equal compute per token)",
            "none": "MoE beats dense"}.get(match, "MoE beats dense")


def quality_lines(study: Study, comps: list[Comparison], match: str) -> list[str]:
    lines = []
    rows = {m.name: m for m in study.at()}
    ref = rows[study.reference]
    for c in comps:
        if c.budget != study.headline:
            continue
        m = rows[c.model]
        if c.measure == "val_loss":
            support = {"ahead": "supports", "behind": "goes against",
                       "within noise": "neither supports nor contradicts"}.get(c.verdict.verdict)
            lines.append(
                f"**{m.name}** vs {ref.name} at {budget_words(study.headline)}: validation loss "
                f"{_pm(m.mean('val_loss'), m.sd('val_loss'))} vs {_pm(ref.mean('val_loss'), ref.sd('val_loss'))} "
                f"({m.mean('active_params') / 1e6:.3f}M active / {m.mean('total_params') / 1e6:.3f}M total vs "
                f"{ref.mean('active_params') / 1e6:.3f}M / {ref.mean('total_params') / 1e6:.3f}M); "
                + _verdict_words(c)
                + (f". This {support} the usual claim that {_claim(match)}, at this scale and budget."
                   if support and m.kind != "dense" and ref.kind == "dense" else "."))
        else:
            lines.append(
                f"At equal training time (the shortest run of each seed) {m.name} has "
                f"{_pm(m.mean('val_loss_at_equal_time'), m.sd('val_loss_at_equal_time'))} vs {ref.name}'s "
                f"{_pm(ref.mean('val_loss_at_equal_time'), ref.sd('val_loss_at_equal_time'))}; "
                + _verdict_words(c) + f"; {m.name} trains at "
                f"{_ratio(m.mean('tokens_per_s'), ref.mean('tokens_per_s'))} {ref.name}'s tokens/s here.")
    return lines


def throughput_lines(study: Study) -> list[str]:
    rows = study.at()
    ref = next(m for m in rows if m.name == study.reference)
    parts = [f"{m.name} {_pm(m.mean('tokens_per_s'), m.sd('tokens_per_s'), '{:,.0f}')} "
             f"({_ratio(m.mean('tokens_per_s'), ref.mean('tokens_per_s'))})" for m in rows]
    mem = [m.mean("peak_memory_bytes") or 0 for m in rows]
    return [f"Training throughput (tokens/s, mean ± sd over seeds; ratio to {ref.name}): "
            + "; ".join(parts) + f". Measured peak training memory ranges from {min(mem) / 2**20:.0f} "
            f"to {max(mem) / 2**20:.0f} MiB."]


def _speed(m: ModelSummary, ref: ModelSummary, key: str) -> str:
    v = speed_verdict(m, ref, key)
    ratio = m.mean(key) / ref.mean(key)
    if v is None or v.basis == "none":
        return f"{ratio:.2f}x (no noise estimate)"
    word = {"ahead": "faster", "behind": "slower", "within noise": "within noise"}[v.verdict]
    return (f"{ratio:.2f}x, **{word}** (log-ratio {-v.gap:+.3f}, threshold ±{v.threshold:.3f} over "
            f"{v.n} {v.basis})")


BYTES_SAME = 0.05     # weight reads within 5% of each other count as "about the same"


def _why(v, bytes_ratio: float) -> str:
    """Does the weight traffic explain the decode-speed verdict ``v``?"""
    reads = ("fewer" if bytes_ratio < 1 - BYTES_SAME else "more" if bytes_ratio > 1 + BYTES_SAME
             else "about as many")
    if v is None or v.verdict in ("within noise", "no noise estimate"):
        return f"no speed difference this study can resolve, reading {reads} weight bytes per token"
    faster = v.verdict == "ahead"
    if (faster and reads == "fewer") or (not faster and reads == "more"):
        return f"as reading {reads} weight bytes per token predicts"
    if not faster:
        return (f"while reading {reads} weight bytes per token, so weight traffic does not explain it: "
                f"at this size the sparse step's extra operations (routing, sorting, one call per "
                f"expert) cost more than its weight reads save")
    return (f"while reading {reads} weight bytes per token, so weight traffic does not explain it: "
            f"the difference is in the cost of the operations themselves, not in weight reads")


def inference_lines(study: Study) -> list[str]:
    rows = study.at()
    ref = next(m for m in rows if m.name == study.reference)
    lines = []
    for m in rows:
        if m.runs[0].inference.get("note"):
            lines.append(f"{m.name}: {m.runs[0].inference['note']}.")
    if ref.mean("decode_tokens_per_s") is None:
        return lines
    for m in rows:
        if m is ref or m.mean("decode_tokens_per_s") is None:
            continue
        b1, r1 = m.mean("weight_bytes_per_token_batch1"), ref.mean("weight_bytes_per_token_batch1")
        b8, r8 = m.mean("weight_bytes_per_token_batch8"), ref.mean("weight_bytes_per_token_batch8")
        touched = m.runs[0].inference.get("experts_touched_batch8") or []
        per_layer = m.runs[0].inference.get("experts_per_layer") or []
        bytes_ratio1 = b1 / r1
        why = _why(speed_verdict(m, ref, "decode_tokens_per_s"), bytes_ratio1)
        line = (f"Decoding, {m.name} vs {ref.name}: batch 1 {_speed(m, ref, 'decode_tokens_per_s')} "
                f"({_pm(m.mean('decode_tokens_per_s'), m.sd('decode_tokens_per_s'), '{:,.0f}')} vs "
                f"{_pm(ref.mean('decode_tokens_per_s'), ref.sd('decode_tokens_per_s'), '{:,.0f}')} tokens/s), "
                f"{why} ({_mb(b1)} vs {_mb(r1)} of weights per token, {bytes_ratio1:.2f}x: one token reads its "
                f"top-k experts, its active parameters, not all of them). Batch 8: {_speed(m, ref, 'decode_tokens_per_s_batch8')}; ")
        if touched:
            line += (f"the 8 tokens of a step reach {', '.join(f'{t:.1f}/{e}' for t, e in zip(touched, per_layer))} "
                     f"experts (per MoE layer), so each token costs "
                     f"{_mb(b8)} of weight reads vs {_mb(r8)} ({b8 / r8:.2f}x). ")
        kv, kv_ref = m.mean("kv_cache_bytes_per_token"), ref.mean("kv_cache_bytes_per_token")
        line += (f"Prefill: {_speed(m, ref, 'prefill_tokens_per_s')}. KV cache: {kv:,.0f} vs {kv_ref:,.0f} "
                 f"bytes per token" + (" (the FFN does not touch the cache)." if kv == kv_ref else
                                       f" ({kv / kv_ref:.2f}x: the attention differs)."))
        lines.append(line)
    return lines


def router_lines(study: Study) -> list[str]:
    lines = []
    rows = study.at()
    for m in rows:
        if m.kind == "dense" or m.mean("load_cv") is None:
            continue
        lines.append(f"{m.name}: expert load CV {_pm(m.mean('load_cv'), m.sd('load_cv'), '{:.2f}')} "
                     f"(max/mean {_pm(m.mean('max_over_mean'), m.sd('max_over_mean'), '{:.2f}')}), dropped "
                     f"{100 * (m.mean('dropped_fraction') or 0):.1f}% of assignments, "
                     f"{sum(m.seeds_of('loss_spikes'))} loss spike(s) over {len(m.runs)} seed(s).")
    if all(sum(m.seeds_of("loss_spikes")) == 0 for m in rows):
        lines.append(f"No run had a loss spike (a step more than {100 * (SPIKE_RATIO - 1):.0f}% above "
                     f"the mean of its previous {SPIKE_WINDOW} steps).")
    return lines


def scaling_section(study: Study, budget_tokens: list[int]) -> dict:
    """results.json's ``scaling``: per-budget losses, fits and crossovers against the reference."""
    models = {}
    for name in study.models:
        rows = [study.by_budget[b][name] for b in study.budgets]
        losses = [r.mean("val_loss") for r in rows]
        fit = fit_power_law(budget_tokens, losses)
        models[name] = {
            "val_loss": losses, "val_loss_sd": [r.sd("val_loss") for r in rows],
            "val_loss_seeds": [r.seeds_of("val_loss") for r in rows],
            "tokens": [r.mean("tokens") for r in rows],
            "train_flops": [TRAIN_FLOPS_PER_FORWARD * r.mean("flops_per_token") * r.mean("tokens") for r in rows],
            "train_time_s": [r.mean("train_time_s") for r in rows],
            "fit": None if fit is None else fit.public(),
            "fit_note": "" if fit is not None else
            f"not fitted: E + A * D^-alpha needs {MIN_POINTS} budgets with falling losses",
        }
    ref = models[study.reference]
    crossings = {}
    for name in study.models:
        if name == study.reference:
            continue
        m = models[name]
        crossings[name] = crossover(budget_tokens, m["val_loss"], ref["val_loss"], m["val_loss_seeds"],
                                    ref["val_loss_seeds"], name, study.reference).public()
    return {"budgets": budget_tokens, "budget_labels": study.budgets, "reference": study.reference,
            "method": "separate runs per budget, each with its own warmup + cosine schedule",
            "models": models, "crossover_tokens": {k: v["tokens"] for k, v in crossings.items()},
            "crossover": crossings}


def scaling_lines(section: dict, comps: list[Comparison]) -> list[str]:
    lines = []
    by_model: dict = {}
    for c in comps:
        if c.measure == "val_loss":
            by_model.setdefault(c.model, []).append(c)
    for name, cs in by_model.items():
        lines.append(f"{name} - {section['reference']} by budget: "
                     + "; ".join(f"{c.verdict.gap:+.4f} at {c.budget} ({c.verdict.verdict}"
                                 + (f", threshold {c.verdict.threshold:.4f})" if c.verdict.threshold else ")")
                                 for c in cs) + ".")
    for name, m in section["models"].items():
        f = m["fit"]
        if f:
            lines.append(f"{name}: loss(D) = {f['E']:.3f} + {f['A']:.4g} x D^-{f['alpha']:.3f} "
                         f"(rms residual {f['rmse']:.4f} over {len(m['val_loss'])} budgets; E is the "
                         f"fitted floor, D in tokens).")
        else:
            lines.append(f"{name}: {m['fit_note']}.")
    lines += [c["statement"] for c in section["crossover"].values()]
    return lines


def all_findings(study: Study, comps: list[Comparison], match_lines: list[str], match: str,
                 scaling: Optional[dict]) -> list[str]:
    lines = noise_lines(study, comps) + quality_lines(study, comps, match) + throughput_lines(study)
    lines += inference_lines(study)
    if scaling is not None:
        lines += scaling_lines(scaling, comps)
    lines += match_lines + router_lines(study)
    return lines
