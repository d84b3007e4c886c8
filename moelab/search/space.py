"""The search space: which layers are MoE, how many experts each has, top-k, expert granularity and
shared experts; its TOML file (``--space FILE.toml``) and the parameter names Optuna sees.

A point of the space is drawn define-by-run (Optuna's way): one yes/no per layer ("is layer i
MoE?", so every subset, all-dense and all-MoE included, is reachable), then an expert count for
each MoE layer only (a dense layer has none), and top-k, granularity and shared experts for every
trial, so that their importance can be estimated over all trials (an all-dense trial ignores them).

Granularity follows DeepSeekMoE's fine-grained expert segmentation (Dai et al. 2024): with
granularity g each expert is split into g experts of 1/g the width, so a layer has g x experts
routed experts and a token goes to g x top-k of them, keeping the active expert width of top-k
unsplit experts. The width itself is then set by the budget (every candidate is resized to the base
model's active parameters), so what a trial chooses is how the active width is cut, not its size.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from moelab.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# key -> what it means (docs/search.md repeats these); the only keys a --space file may hold
SPACE_KEYS = {
    "moe_layers": '"any" (every subset of layers, all-dense and all-MoE included) or a list of '
                  'layer-index lists to choose from, e.g. [[], [1, 3], [0, 1, 2, 3]]',
    "experts": "routed experts per MoE layer before granularity splits them: the choices, each >= 1",
    "per_layer_experts": "true: an expert count drawn for each MoE layer (pyramids reachable); "
                         "false: one count for all of a trial's MoE layers",
    "top_k": "experts a token is routed to, before granularity: the choices, each >= 1 and "
             "<= the smallest expert count",
    "granularity": "each expert split into g experts of 1/g the width, with g x the experts and "
                   "g x top-k (DeepSeekMoE): the choices, each >= 1",
    "shared_experts": "always-active shared experts per MoE layer (DeepSeekMoE): the choices, each >= 0",
}


@dataclass(frozen=True)
class SearchSpace:
    moe_layers: Union[str, tuple[tuple[int, ...], ...]] = "any"
    experts: tuple[int, ...] = (4, 8, 16)
    per_layer_experts: bool = True
    top_k: tuple[int, ...] = (1, 2)
    granularity: tuple[int, ...] = (1, 2, 4)
    shared_experts: tuple[int, ...] = (0, 1)

    def public(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.moe_layers, str):
            d["moe_layers"] = [list(p) for p in self.moe_layers]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def describe(self) -> str:
        layers = ("any subset of layers" if self.moe_layers == "any"
                  else "one of " + ", ".join(pattern_text(p) for p in self.moe_layers))
        per = "per MoE layer" if self.per_layer_experts else "one count for all MoE layers"
        return (f"MoE layers: {layers}; experts {list(self.experts)} ({per}); top-k {list(self.top_k)}; "
                f"granularity {list(self.granularity)}; shared experts {list(self.shared_experts)}")


DEFAULT_SPACE = SearchSpace()


def pattern_text(layers) -> str:
    return "[" + ", ".join(map(str, layers)) + "]"


def _where(source: str) -> str:
    return f"--space {source}" if source else "--space"


def _int_choices(source: str, key: str, value, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{_where(source)}: {key} = {value!r} is invalid: must be a non-empty list "
                          f"of integers >= {low}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{_where(source)}: {key} = {value!r} is invalid: every choice must be "
                              f"an integer >= {low} (got {v!r})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{_where(source)}: {key} = {value!r} is invalid: a choice repeats")
    return tuple(value)


def _patterns(source: str, value, n_layers: int) -> Union[str, tuple[tuple[int, ...], ...]]:
    if value == "any":
        return "any"
    bad = (f"{_where(source)}: moe_layers = {value!r} is invalid: must be \"any\" or a non-empty list "
           f"of layer-index lists, each index in [0, {n_layers - 1}]")
    if not isinstance(value, list) or not value or not all(isinstance(p, list) for p in value):
        raise ConfigError(bad)
    out = []
    for p in value:
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in p):
            raise ConfigError(bad + f" (got {p!r})")
        if len(set(p)) != len(p):
            raise ConfigError(f"{_where(source)}: moe_layers: the pattern {p!r} repeats a layer")
        out.append(tuple(sorted(p)))
    if len(set(out)) != len(out):
        raise ConfigError(f"{_where(source)}: moe_layers = {value!r} is invalid: a pattern repeats")
    return tuple(out)


def space_from_dict(data: dict, n_layers: int, source: str = "") -> SearchSpace:
    """Validate a space (keys and values) for a model of ``n_layers``; errors name the key."""
    for key in data:
        if key not in SPACE_KEYS:
            close = difflib.get_close_matches(key, list(SPACE_KEYS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{_where(source)}: unknown key '{key}'{hint} (the keys are "
                              f"{', '.join(SPACE_KEYS)})")
    d = DEFAULT_SPACE
    per_layer = data.get("per_layer_experts", d.per_layer_experts)
    if not isinstance(per_layer, bool):
        raise ConfigError(f"{_where(source)}: per_layer_experts = {per_layer!r} is invalid: must be "
                          f"true or false")
    space = SearchSpace(
        moe_layers=_patterns(source, data.get("moe_layers", d.moe_layers), n_layers),
        experts=_int_choices(source, "experts", data.get("experts", list(d.experts)), 1),
        per_layer_experts=per_layer,
        top_k=_int_choices(source, "top_k", data.get("top_k", list(d.top_k)), 1),
        granularity=_int_choices(source, "granularity", data.get("granularity", list(d.granularity)), 1),
        shared_experts=_int_choices(source, "shared_experts",
                                    data.get("shared_experts", list(d.shared_experts)), 0),
    )
    if max(space.top_k) > min(space.experts):
        raise ConfigError(f"{_where(source)}: top_k = {list(space.top_k)} is invalid: every top-k "
                          f"must be <= the smallest expert count ({min(space.experts)}), so that "
                          f"every combination can be built")
    return space


def load_space(path: str | Path, n_layers: int) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {str(path)!r}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--space {str(path)!r} is not valid TOML: {e}") from None
    return space_from_dict(data, n_layers, str(path))


# ---- the names Optuna sees --------------------------------------------------------------------------

def layer_param(i: int) -> str:
    return f"moe_layer_{i}"


def experts_param(i: int | None) -> str:
    return "experts" if i is None else f"experts_layer_{i}"


def suggest(trial, space: SearchSpace, n_layers: int):
    """Draw one candidate from ``trial`` (an ``optuna.Trial``; an adopted trial gets back the
    values it drew before). Returns a :class:`moelab.search.candidate.Candidate`."""
    from moelab.search.candidate import Candidate
    if space.moe_layers == "any":
        layers = tuple(i for i in range(n_layers) if trial.suggest_categorical(layer_param(i), [False, True]))
    else:
        texts = [",".join(map(str, p)) for p in space.moe_layers]
        chosen = trial.suggest_categorical("moe_layers", texts)
        layers = tuple(int(x) for x in chosen.split(",") if x)
    top_k = trial.suggest_categorical("top_k", list(space.top_k))
    granularity = trial.suggest_categorical("granularity", list(space.granularity))
    shared = trial.suggest_categorical("shared_experts", list(space.shared_experts))
    if not layers:
        counts: tuple[int, ...] = ()
    elif space.per_layer_experts:
        counts = tuple(trial.suggest_categorical(experts_param(i), list(space.experts)) for i in layers)
    else:
        counts = (trial.suggest_categorical(experts_param(None), list(space.experts)),) * len(layers)
    return Candidate(moe_layers=layers, experts=tuple(e * granularity for e in counts),
                     top_k=top_k * granularity, granularity=granularity, shared_experts=shared)
