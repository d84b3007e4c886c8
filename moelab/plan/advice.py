"""The same budget spent on a Dense, an MoE and a Hybrid model, and a verdict from the numbers.

By default the three are built from the user's model at its active parameter count (the usual
fair comparison: about the same FLOPs per token), as ``moelab compare`` matches its presets:

- Dense: every layer a SwiGLU whose width makes the active parameters match;
- MoE: an MoE in every layer (after the model's leading dense layers) with the model's experts, or,
  for a dense model, 8 experts top-2 (Mixtral's shape) whose width matches the active parameters;
- Hybrid: an MoE in every second layer with the same experts, the dense layers' width matched.

The model the user gave is kept as it is for its own kind. ``--compare A,B,C`` plans the user's
models instead. The verdict reports fit, speed, memory and communication; it does not predict
loss, which no on-paper model can.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from moelab.accounting import param_counts
from moelab.config import ConfigError, ModelConfig
from moelab.plan.inputs import Hardware, Workload
from moelab.plan.planner import Plan, plan
from moelab.plan.source import ModelSource
from moelab.plan.units import human_bytes, human_count, human_seconds

DEFAULT_EXPERTS, DEFAULT_TOP_K = 8, 2


def kind(m: ModelConfig) -> str:
    moe = m.moe_layer_indices()
    if not moe:
        return "dense"
    return "moe" if moe == list(range(m.moe.first_dense, m.n_layers)) else "hybrid"


def _granule(m: ModelConfig) -> int:
    return 64 if m.d_model >= 1024 else 16


def _solve_width(build: Callable[[int], ModelConfig], target: int, granule: int) -> ModelConfig:
    """The width w (a multiple of granule) whose model's active parameters are nearest target;
    active parameters are linear in any one FFN width."""
    a1 = param_counts(build(granule))["active"]
    a2 = param_counts(build(2 * granule))["active"]
    slope = (a2 - a1) / granule
    w = max(granule, round((target - a1) / slope / granule) * granule + granule) if slope else granule
    return build(int(w))


def _replace_moe(m: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(m, moe=dataclasses.replace(m.moe, **changes))


def matched_variants(source: ModelSource) -> list[ModelSource]:
    m = source.config.model
    target = param_counts(m)["active"]
    g = _granule(m)
    own = kind(m)
    if own == "dense":
        moe_base = _replace_moe(m, layers="all", every=1, first_dense=0, num_experts=DEFAULT_EXPERTS,
                                num_experts_per_layer=None, top_k=DEFAULT_TOP_K, router="softmax",
                                n_groups=1, topk_groups=1, num_shared_experts=0)
    else:
        moe_base = _replace_moe(m, layers="all", every=1, num_experts_per_layer=None,
                                num_experts=m.experts_in_layer(m.moe_layer_indices()[0]))
    builders = {
        "dense": lambda w: dataclasses.replace(_replace_moe(m, layers="none"), ffn_hidden=w),
        "moe": lambda w: _replace_moe(moe_base, expert_hidden=w),
        "hybrid": lambda w: dataclasses.replace(_replace_moe(moe_base, every=2), ffn_hidden=w),
    }
    out = []
    for name in ("dense", "moe", "hybrid"):
        if name == own:
            out.append(source)
            continue
        model = _solve_width(builders[name], target, g)
        if name == "hybrid" and not model.moe_layer_indices():
            continue          # a one-layer model has no "every other layer"
        cfg = dataclasses.replace(source.config, model=model)
        try:
            cfg.validate()
        except ConfigError:
            continue
        out.append(ModelSource(name, cfg, (), source.family, 0))
    return out


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    plan: Plan

    @property
    def best(self):
        return self.plan.best

    def to_dict(self) -> dict:
        b, c = self.best, self.plan.counts
        d = {"name": self.name, "kind": self.kind, "total_params": c.total_params,
             "active_params": c.active_params, "fits": b is not None,
             "min_memory_bytes_per_gpu": self.plan.smallest.memory.total}
        if b is not None:
            d.update(best_layout={"dp_shard": b.layout.dp_shard, "dp_replicate": b.layout.dp_replicate,
                                  "ep": b.layout.ep, "activation_checkpointing": b.layout.activation_checkpointing,
                                  "micro_batch_size": b.layout.micro_batch},
                     step_time_s=b.time.step_s, tokens_per_day=self.plan.tokens_per_day(b), mfu=b.time.mfu,
                     headroom_bytes=b.headroom_bytes, comm_share=b.time.comm_share,
                     alltoall_share=b.time.alltoall_share)
        return d


def advise(sources: list[ModelSource], hw: Hardware, wl: Workload, basis: str,
           plans: Optional[dict[str, Plan]] = None, yours: Optional[str] = None) -> dict:
    rows = []
    for s in sources:
        p = (plans or {}).get(s.name) or plan(s, hw, wl)
        rows.append(Row(s.name, kind(s.config.model) + (" (yours)" if s.name == yours else ""), p))
    return {"basis": basis, "rows": [r.to_dict() for r in rows], "verdict": verdict(rows, hw, wl)}


def verdict(rows: list[Row], hw: Hardware, wl: Workload) -> list[str]:
    """A few sentences computed from the rows: fit, speed, memory, communication."""
    setup = f"{hw.gpus} x {human_bytes(hw.gpu_memory)} GPUs"
    fit = [r for r in rows if r.best is not None]
    out = []
    if not fit:
        near = min(rows, key=lambda r: r.plan.smallest.memory.total)
        need = near.plan.smallest.memory.total
        out.append(f"None of the {len(rows)} models fits on {setup} in any layout moelab can run: the closest, "
                   f"{near.name}, needs {human_bytes(need)} per GPU at best, {need / hw.usable_memory:.1f}x the "
                   f"{human_bytes(hw.usable_memory)} usable. More GPUs (sharding divides the model states) or "
                   "more memory per GPU would change that.")
        return out
    tpd = {r.name: r.plan.tokens_per_day(r.best) for r in fit}
    fastest = max(fit, key=lambda r: tpd[r.name])
    others = [f"{r.name} {tpd[r.name] / tpd[fastest.name]:.2f}x" for r in fit if r is not fastest]
    b = fastest.best
    detail = (f"{human_count(tpd[fastest.name])} tokens/day, best layout {b.layout.label()}, step "
              f"{human_seconds(b.time.step_s)}, MFU {b.time.mfu:.0%}")
    if len(fit) > 1 and all(tpd[r.name] >= 0.99 * tpd[fastest.name] for r in fit):
        out.append(f"On {setup}, the {len(fit)} models that fit train equally fast within 1% ({detail} for "
                   f"{fastest.name}): at matched active parameters the FLOPs per token are the same and "
                   "communication costs little here.")
    else:
        out.append(f"On {setup}, {fastest.name} trains the most tokens per day ({detail})"
                   + (f"; relative to it: {', '.join(others)}." if others else "."))
    for r in rows:
        if r.best is None:
            need = r.plan.smallest.memory.total
            top = r.plan.smallest.overflow_parts()[:2]
            out.append(f"{r.name} does not fit in any layout: its smallest needs {human_bytes(need)} per GPU "
                       f"({human_bytes(need - hw.usable_memory)} over; largest parts "
                       f"{', '.join(f'{k} {human_bytes(v)}' for k, v in top)}).")
    moe_fit = [r for r in fit if r.plan.counts.moe_layers and r.best.layout.ep > 1]
    for r in moe_fit:
        b = r.best
        where = "inside a node" if b.layout.ep <= hw.gpus_per_node else \
            f"across {b.layout.ep // hw.gpus_per_node} nodes"
        out.append(f"{r.name} spends {b.time.alltoall_share:.0%} of its step in all-to-all (ep {b.layout.ep}, "
                   f"{where}; {human_bytes(b.alltoall.bytes_per_layer)} per MoE layer per GPU forward).")
    no_ep = [r for r in fit if r.plan.counts.moe_layers and r.best.layout.ep == 1]
    if no_ep:
        times = ", ".join(f"{r.name} {human_seconds(r.best.time.fsdp_s)} under {human_seconds(r.best.time.compute_s)}"
                          for r in no_ep)
        out.append(f"No expert parallelism in the best layout of {', '.join(r.name for r in no_ep)}: FSDP "
                   f"all-gathers the experts and that traffic hides behind compute ({times}), cheaper here "
                   "than an all-to-all, which nothing overlaps.")
    dense = [r for r in rows if not r.plan.counts.moe_layers]
    sparse = [r for r in rows if r.plan.counts.moe_layers]
    if dense and sparse:
        d = dense[0]
        parts = [f"{r.name} {r.plan.counts.total_params / d.plan.counts.total_params:.1f}x at "
                 f"{r.plan.counts.active_params / d.plan.counts.active_params:.2f}x the active "
                 f"({human_bytes(r.plan.smallest.memory.total)})" for r in sparse]
        out.append(f"Parameters against {d.name} (and the least memory per GPU any layout needs, "
                   f"{d.name} {human_bytes(d.plan.smallest.memory.total)}): {'; '.join(parts)}.")
    tight = [r.name for r in fit if r.best.headroom_bytes < 0.1 * hw.gpu_memory]
    if tight:
        out.append(f"Under 10% of GPU memory to spare in the best layout: {', '.join(tight)}; allocator "
                   "fragmentation or routing imbalance could push it over.")
    out.append("Loss is not estimated: at matched active parameters MoE models usually reach a lower loss "
               "per token (Switch, Mixtral, DeepSeekMoE); `moelab compare` measures that at small scale.")
    return out


def compare_sources(specs: list[str], overrides: list[str]) -> list[ModelSource]:
    from moelab.plan.source import load_source
    names = [s.strip() for s in specs if s.strip()]
    if not names:
        raise ConfigError("--compare is empty: name at least one preset, config TOML or config.json")
    out = [load_source(n, overrides) for n in names]
    if len({s.name for s in out}) != len(out):
        raise ConfigError(f"--compare = {','.join(names)} is invalid: names repeat")
    return out
