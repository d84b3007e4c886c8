"""Upcycled arms of a comparison: ``moelab compare --from RUN --models dense,upcycle:E=8,K=2,method=drop``.

Every arm continues the finished dense run RUN for the same extra tokens (``--budget``), at each
seed: ``dense`` keeps training RUN's weights as they are; ``upcycle:...`` trains RUN upcycled
with those options (``moelab.adapt.upcycle``, the seed also drawing its router and drop
subsets); and for each MoE shape among the upcycled arms a ``scratch`` arm trains that MoE from
random weights for RUN's tokens plus the extra ones (Komatsuzaki et al. 2023's from-scratch
baseline). Every arm uses RUN's tokenizer, corpus and training settings with a fresh optimiser
and a new warmup + cosine schedule over its budget, so all of them are scored on the same
validation batches and the report pairs them seed by seed.

The plan has the shape of ``moelab.compare.plan.build_plan``'s (units are ordinary
``moelab train`` runs), plus a ``continuation`` section naming the upcycled folders that
``prepare_arms`` writes before training.

Arm spelling: ``upcycle:`` followed by comma-separated ``key=value`` (keys E/experts, K/top_k,
method, r/drop_ratio, G/granularity, S/shared, layers, router/router_init); the comma also
separates arms, so a new arm starts at a name (``dense``, ``upcycle:``). A layer list inside an
arm uses ``+``: ``layers=1+3``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from moelab.adapt.upcycle import UpcycleOptions, upcycled_config
from moelab.config import Config, ConfigError

ARM_KEYS = {"e": "experts", "experts": "experts", "k": "top_k", "top_k": "top_k", "method": "method",
            "r": "drop_ratio", "drop_ratio": "drop_ratio", "g": "granularity", "granularity": "granularity",
            "s": "shared", "shared": "shared", "layers": "layers", "router": "router_init",
            "router_init": "router_init"}
INT_KEYS = ("experts", "top_k", "granularity", "shared")
# train.* keys an arm takes from RUN (its budget, schedule length and seed are the arm's own)
OWN_TRAIN_KEYS = ("max_steps", "max_tokens", "max_minutes", "seed", "eval_every", "save_every",
                  "warmup_steps", "log_every")
UPCYCLED_DIR = "upcycled"


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str                                   # "dense" | "upcycle" | "scratch"
    spec: str
    options: Optional[UpcycleOptions] = None    # upcycle and scratch: the MoE's shape


def parse_arms(text: str) -> list[Arm]:
    """``dense,upcycle:E=8,K=2,method=drop`` -> arms; scratch arms are added by the plan."""
    items: list[list[str]] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if ":" in token or "=" not in token or not items:
            items.append([token])
        else:
            items[-1].append(token)
    arms = []
    for item in items:
        head = item[0]
        if head == "dense" and len(item) == 1:
            arms.append(Arm("dense", "dense", "dense"))
            continue
        kind, _, first = head.partition(":")
        if kind != "upcycle":
            raise ConfigError(f"--models with --from: unknown arm {head!r}: use dense or "
                              f"upcycle:E=8,K=2[,method=drop,r=0.5,G=1,S=0,layers=all,router=normal]")
        values: dict = {}
        for pair in ([first] if first else []) + item[1:]:
            key, sep, value = pair.partition("=")
            field_name = ARM_KEYS.get(key.strip().lower())
            if not sep or field_name is None:
                raise ConfigError(f"--models: {pair!r} in arm {','.join(item)!r} is not one of "
                                  f"{', '.join(sorted(set(ARM_KEYS)))} = value")
            value = value.strip()
            try:
                values[field_name] = (int(value) if field_name in INT_KEYS else
                                      float(value) if field_name == "drop_ratio" else
                                      value.replace("+", ","))
            except ValueError:
                raise ConfigError(f"--models: {key} = {value!r} in arm {','.join(item)!r} is not a number") from None
        missing = [k for k in ("experts", "top_k") if k not in values]
        if missing:
            raise ConfigError(f"--models: arm {','.join(item)!r} needs E= and K= (missing {', '.join(missing)})")
        opts = UpcycleOptions(**values)
        arms.append(Arm(arm_name(opts), "upcycle", ",".join(item), opts))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"--models = {text!r} is invalid: an arm repeats")
    if not any(a.kind == "dense" for a in arms):
        raise ConfigError("--models with --from must include dense (the continued dense run every arm is judged against)")
    return arms


def arm_name(opts: UpcycleOptions, kind: str = "upcycle") -> str:
    """A folder-safe name that says what differs: upcycle-drop-E8-K2, scratch-E8-K2-G2-S1."""
    parts = [kind] + ([opts.method] if kind == "upcycle" else []) + [f"E{opts.experts}", f"K{opts.top_k}"]
    if opts.granularity > 1:
        parts.append(f"G{opts.granularity}")
    if opts.shared:
        parts.append(f"S{opts.shared}")
    if opts.layers != "all":
        parts.append("L" + re.sub(r"[^0-9a-z]+", "+", opts.layers.lower()))
    if kind == "upcycle" and opts.method == "drop" and opts.drop_ratio != 0.5:
        parts.append(f"r{opts.drop_ratio:g}")
    if kind == "upcycle" and opts.router_init != "normal":
        parts.append(f"router-{opts.router_init}")
    return "-".join(parts)


def _shape(opts: UpcycleOptions) -> tuple:
    return (opts.experts, opts.top_k, opts.granularity, opts.shared, opts.layers)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)                       # a TOML basic string, whatever it holds
    return repr(v)


def flat_overrides(obj, prefix: str, skip: tuple = ()) -> list[str]:
    """A config dataclass as ``prefix.key=value`` overrides (nested sections flattened)."""
    out = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += flat_overrides(v, f"{prefix}.{f.name}")
        else:
            out.append(f"{prefix}.{f.name}={_value(v)}")
    return out


def continuation_plan(models_text: str, source: str, budget_text: Optional[str], seeds_text, overrides: list[str],
                      out_dir: Path, command: str) -> dict:
    """The plan of ``moelab compare --from RUN``: every arm for ``budget_text`` extra tokens at
    every seed, plus the scratch arms; validated before anything is written."""
    from moelab import resolve_config
    from moelab.accounting import describe
    from moelab.compare.matching import Sizing
    from moelab.compare.plan import PLAN_VERSION, RUNS_DIR, budget_overrides, parse_budget, parse_seeds
    from moelab.runfolder import TOKENIZER_FILE, read_config, read_summary, resolve

    folder = resolve(source).resolve()
    src = read_config(folder)
    summary = read_summary(folder)
    if summary is None:
        raise ConfigError(f"--from {source!r}: the run has not finished (no summary.json); compare "
                          f"continues a finished dense run")
    if src.model.moe_layer_indices():
        raise ConfigError(f"--from {source!r}: the run has MoE layers; --from continues a dense run")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ConfigError(f"--from {source!r}: the run has no {TOKENIZER_FILE}")
    for o in overrides:
        if not o.strip().startswith("train."):
            raise ConfigError(f"--set {o.split('=')[0]}: with --from the model and data are RUN's; only "
                              f"train.* keys may be set")
    budget = parse_budget(budget_text or "200k")
    if budget.tokens is None:
        raise ConfigError(f"--budget = {budget_text!r} is invalid with --from: give extra tokens ('500k')")
    dense_tokens = int(summary["tokens"])
    seeds = parse_seeds(seeds_text, src.train.seed + 1)
    arms = parse_arms(models_text)
    for arm in arms:
        if arm.options is not None:
            upcycled_config(src, arm.options)                         # refuse bad options now
    shapes: dict[tuple, UpcycleOptions] = {}
    for arm in arms:
        if arm.kind == "upcycle":
            shapes.setdefault(_shape(arm.options), arm.options)
    arms += [Arm(arm_name(o, "scratch"), "scratch", "scratch:" + arm_name(o, "scratch"), o) for o in shapes.values()]

    t = src.train
    data = dataclasses.replace(src.data, tokenizer=str(folder / TOKENIZER_FILE))
    shared = flat_overrides(t, "train", OWN_TRAIN_KEYS) + flat_overrides(data, "data")
    extra_budget = budget_overrides(budget, t.batch_size, t.seq_len)
    eval_every = next(o for o in extra_budget if o.startswith("train.eval_every"))
    entries, units, upcycles = [], [], []
    ref_counts = describe(src.model, 1, 1)
    for arm in arms:
        model = src.model if arm.kind == "dense" else upcycled_config(src, arm.options).model
        counts = describe(model, 1, 1)
        sizing = Sizing(arm.name, "as given", {}, counts["total_params"], counts["active_params"],
                        counts["total_params"] / ref_counts["total_params"],
                        counts["active_params"] / ref_counts["active_params"],
                        {"dense": "RUN's weights", "upcycle": "RUN upcycled",
                         "scratch": "random weights"}[arm.kind])
        entries.append({"name": arm.name, "spec": arm.spec, "kind": arm.kind, "overrides": [],
                        "sizing": sizing.public(),
                        "upcycle": dataclasses.asdict(arm.options) if arm.options else None})
    lineup = list(zip(arms, entries))
    label = budget.label
    for i, seed in enumerate(seeds):
        k = i % len(lineup)
        for arm, entry in lineup[k:] + lineup[:k]:
            uid = f"{arm.name}-s{seed}-{label}"
            if arm.kind == "scratch":
                own = [o for o in budget_overrides(parse_budget(str(dense_tokens + budget.tokens)),
                                                   t.batch_size, t.seq_len) if not o.startswith("train.eval_every")]
                args = flat_overrides(arm_model(src, arm.options), "model") + shared + own + [eval_every]
                start: list[str] = []
            else:
                args = shared + extra_budget
                start = ["--init-from", str(folder)]
                if arm.kind == "upcycle":
                    up_dir = out_dir.resolve() / UPCYCLED_DIR / f"{arm.name}-s{seed}"
                    upcycles.append({"folder": str(up_dir), "options": {**dataclasses.asdict(arm.options),
                                                                        "seed": seed}})
                    start = ["--init-from", str(up_dir)]
            args = args + [f"train.seed={seed}"] + overrides
            resolve_config(Config(), [a for a in args if not a.startswith("model.")] if arm.kind != "scratch"
                           else args).validate()                       # named errors before training
            units.append({"id": uid, "model": arm.name, "seed": seed, "budget": label,
                          "budget_tokens": budget.tokens, "budget_seconds": None,
                          "run_dir": f"{RUNS_DIR}/{uid}",     # relative to the compare folder
                          "train_args": start + sum((["--set", a] for a in args), [])})
    matching = [f"Continuation of {folder} (dense, {dense_tokens:,} tokens): dense and every upcycled "
                f"arm train {budget.tokens:,} extra tokens from its weights; "
                + ", ".join(f"{a.name} trains {dense_tokens + budget.tokens:,} tokens from random weights"
                            for a in arms if a.kind == "scratch") + "."]
    return {"version": PLAN_VERSION, "models": entries, "seeds": seeds, "budgets": [label], "nproc": 1,
            "budget_tokens": [budget.tokens], "scaling": False, "match": "none", "matching": matching,
            "overrides": overrides, "units": units, "command": command,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "continuation": {"from": str(folder), "dense_tokens": dense_tokens, "extra_tokens": budget.tokens,
                             "upcycle": upcycles}}


def arm_model(src: Config, opts: UpcycleOptions):
    return upcycled_config(src, opts).model


def prepare_arms(plan: dict, log: Callable[[str], None] = print) -> None:
    """Write the upcycled folders the plan's arms start from; a complete folder (its
    run_meta.json is written last) is kept, a partial one is written again."""
    from moelab.adapt.upcycle import upcycle
    from moelab.runfolder import RUN_META_FILE
    cont = plan.get("continuation") or {}
    for item in cont.get("upcycle", []):
        folder = Path(item["folder"])
        if (folder / RUN_META_FILE).is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        upcycle(cont["from"], UpcycleOptions(**item["options"]), folder, command="moelab compare --from",
                log=log)
        log(f"upcycled {cont['from']} -> {folder}")


def is_continuation(plan: dict) -> bool:
    return bool(plan.get("continuation"))


__all__ = ["Arm", "arm_name", "continuation_plan", "flat_overrides", "is_continuation", "parse_arms",
           "prepare_arms"]
