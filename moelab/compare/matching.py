"""Size the compared models so that their parameter counts match, from moelab.accounting alone.

``active``: every model gets the reference's active parameters (what one token uses); ``total``:
every model gets its total parameters; ``both``: equal total *and* active, as the DeepSeekMoE
ablations (Dai et al. 2024) hold GShard and DeepSeekMoE at the same total and activated counts.
``none``: the configs train as given.

The reference keeps its size. For ``active`` and ``total`` it is the first dense model (the usual
baseline), else the first model; for ``both`` it is the first sparse model, because a dense
model's total always equals its active count: a dense model cannot match a sparse one on both, so
in that mode dense models are matched on active parameters and the report says so.

Knobs, changed through the same ``--set`` overrides a user would write: a sparse model's
``model.moe.expert_hidden`` (one equation: active or total), plus ``model.moe.num_experts`` and,
for a hybrid, the dense layers' ``model.ffn_hidden`` for ``both`` (two equations); a dense model's
``model.ffn_hidden``. Parameter counts are affine in each width, so each equation is solved in
closed form from two evaluations of ``param_counts``, rounded, and the nearest integers checked.
A model already within ``SLACK`` of its target is left as configured.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Literal, Optional

from moelab.accounting import param_counts
from moelab.config import ConfigError, ModelConfig

MatchMode = Literal["active", "total", "both", "none"]
MATCH_MODES = ("active", "total", "both", "none")
TOLERANCE = 0.05                # the report flags a model further than 5% from its target
SLACK = 0.01                    # a model already within 1% of its target keeps its config: the
                                # presets are matched by hand up to their routers' few weights


@dataclass(frozen=True)
class Sizing:
    """How one model was sized. ``changes``: field -> (before, after); ``total_ratio`` and
    ``active_ratio``: this model's counts over the reference's."""

    name: str
    matched_on: str              # "reference", "active", "total", "active and total", "as given"
    changes: dict
    total: int
    active: int
    total_ratio: float
    active_ratio: float
    note: str = ""

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={after}" for key, (_, after) in self.changes.items()]

    def within_tolerance(self) -> bool:
        checks = {"active": [self.active_ratio], "total": [self.total_ratio],
                  "active and total": [self.active_ratio, self.total_ratio]}.get(self.matched_on, [])
        return all(abs(r - 1) <= TOLERANCE for r in checks)

    def public(self) -> dict:
        d = dict(self.__dict__)
        d["changes"] = {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()}
        d["within_5_percent"] = self.within_tolerance()
        return d


def is_sparse(m: ModelConfig) -> bool:
    return bool(m.moe_layer_indices())


def _counts(m: ModelConfig) -> tuple[int, int]:
    c = param_counts(m)
    return c["total"], c["active"]


def _with(m: ModelConfig, *, ffn_hidden: Optional[int] = None, expert_hidden: Optional[int] = None,
          num_experts: Optional[int] = None) -> ModelConfig:
    moe = m.moe
    if expert_hidden is not None or num_experts is not None:
        moe = dataclasses.replace(moe, expert_hidden=expert_hidden or moe.expert_hidden,
                                  num_experts=num_experts or moe.num_experts)
    return dataclasses.replace(m, ffn_hidden=ffn_hidden or m.ffn_hidden, moe=moe)


def _solve_one(m: ModelConfig, knob: str, which: int, target: int) -> int:
    """Width for ``knob`` that brings count ``which`` (0 total, 1 active) nearest to ``target``."""
    base = getattr(m, knob) if knob == "ffn_hidden" else getattr(m.moe, knob)
    c0 = _counts(_with(m, **{knob: base}))[which]
    slope = _counts(_with(m, **{knob: base + 1}))[which] - c0
    if slope <= 0:
        raise ConfigError(f"--match: {knob} does not change the parameter count of this model")
    guess = base + round((target - c0) / slope)
    best = min((w for w in range(guess - 2, guess + 3) if w >= 1),
               key=lambda w: abs(_counts(_with(m, **{knob: w}))[which] - target), default=None)
    if best is None:
        raise ConfigError(f"--match: no positive {knob} reaches {target:,} parameters "
                          f"(the rest of the model alone has more); shrink other sizes with --set")
    return best


def _error(m: ModelConfig, total: int, active: int) -> float:
    t, a = _counts(m)
    return max(abs(t / total - 1), abs(a / active - 1))


def _solve_both(m: ModelConfig, total: int, active: int) -> ModelConfig:
    """Equal total and active: for every expert count from top_k + 1 to 4x the configured one,
    solve the widths (expert_hidden, and ffn_hidden when the model has dense layers) and keep the
    closest (to 0.1%); among those, the one that changes the configured sizes least (sum of
    relative changes)."""
    has_dense = len(m.moe_layer_indices()) < m.n_layers
    fixed_counts = m.moe.num_experts_per_layer is not None
    options = [m.moe.num_experts] if fixed_counts else range(m.moe.top_k + 1, 4 * m.moe.num_experts + 1)
    best, best_key = None, None
    for E in options:
        cand = _with(m, num_experts=E)
        try:
            if has_dense:
                # two affine equations in (expert_hidden, ffn_hidden), solved at the configured point
                h0, f0 = cand.moe.expert_hidden, cand.ffn_hidden
                t0, a0 = _counts(cand)
                th, ah = (x - y for x, y in zip(_counts(_with(cand, expert_hidden=h0 + 1)), (t0, a0)))
                tf, af = (x - y for x, y in zip(_counts(_with(cand, ffn_hidden=f0 + 1)), (t0, a0)))
                det = th * af - tf * ah
                if det == 0:
                    continue
                dh = ((total - t0) * af - tf * (active - a0)) / det
                df = (th * (active - a0) - (total - t0) * ah) / det
                h, f = round(h0 + dh), round(f0 + df)
                grid = [(h + i, f + j) for i, j in itertools.product(range(-1, 2), repeat=2) if h + i >= 1 and f + j >= 1]
                if not grid:
                    continue
                cand = min((_with(cand, expert_hidden=hh, ffn_hidden=ff) for hh, ff in grid),
                           key=lambda c: _error(c, total, active))
            else:
                cand = _with(cand, expert_hidden=_solve_one(cand, "expert_hidden", 1, active))
        except ConfigError:
            continue
        change = (abs(E / m.moe.num_experts - 1) + abs(cand.moe.expert_hidden / m.moe.expert_hidden - 1)
                  + abs(cand.ffn_hidden / m.ffn_hidden - 1))
        key = (round(_error(cand, total, active), 3), change)
        if best_key is None or key < best_key:
            best, best_key = cand, key
    if best is None:
        raise ConfigError("--match both: no expert count and widths match the reference's total "
                          "and active parameters; try --match active or --match total")
    return best


_KNOB_KEYS = {"ffn_hidden": "model.ffn_hidden", "expert_hidden": "model.moe.expert_hidden",
              "num_experts": "model.moe.num_experts"}


def _changes(before: ModelConfig, after: ModelConfig) -> dict:
    out = {}
    for knob, key in _KNOB_KEYS.items():
        a = getattr(before, knob) if knob == "ffn_hidden" else getattr(before.moe, knob)
        b = getattr(after, knob) if knob == "ffn_hidden" else getattr(after.moe, knob)
        if a != b:
            out[key] = (a, b)
    return out


def reference_index(models: list[ModelConfig], mode: str) -> int:
    if mode == "both":
        return next((i for i, m in enumerate(models) if is_sparse(m)), 0)
    return next((i for i, m in enumerate(models) if not is_sparse(m)), 0)


def match_models(names: list[str], models: list[ModelConfig], mode: str) -> list[Sizing]:
    """One Sizing per model, in order; apply ``Sizing.overrides`` to each model's config."""
    if mode not in MATCH_MODES:
        raise ConfigError(f"--match = {mode!r} is invalid: must be one of {', '.join(MATCH_MODES)}")
    ref_i = reference_index(models, mode)
    ref_total, ref_active = _counts(models[ref_i])
    out = []
    for i, (name, m) in enumerate(zip(names, models)):
        note = ""
        if i == ref_i or mode == "none":
            new, how = m, "reference" if i == ref_i and mode != "none" else "as given"
        elif mode == "both" and is_sparse(m):
            how = "active and total"
            new = m if _error(m, ref_total, ref_active) <= SLACK else _solve_both(m, ref_total, ref_active)
        else:
            which = 0 if mode == "total" else 1
            target = ref_total if which == 0 else ref_active
            knob = "expert_hidden" if is_sparse(m) else "ffn_hidden"
            how = "total" if which == 0 else "active"
            new = m if abs(_counts(m)[which] / target - 1) <= SLACK else \
                _with(m, **{knob: _solve_one(m, knob, which, target)})
            if mode == "both":
                note = "a dense model's total equals its active count, so it is matched on active only"
        total, active = _counts(new)
        out.append(Sizing(name, how, _changes(m, new), total, active,
                          total / ref_total, active / ref_active, note))
    return out


def describe_matching(sizings: list[Sizing], mode: str) -> list[str]:
    """Sentences for the report: what was matched and how close each model came."""
    if mode == "none":
        return ["Models train as configured (--match none): parameter counts are not matched."]
    ref = next(s for s in sizings if s.matched_on == "reference")
    what = {"active": "active parameters", "total": "total parameters",
            "both": "total and active parameters"}[mode]
    lines = [f"Matched on {what} (--match {mode}) to **{ref.name}** ({ref.total / 1e6:.3f}M total, "
             f"{ref.active / 1e6:.3f}M active)."]
    for s in sizings:
        if s is ref:
            continue
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in s.changes.items()) or "no size change needed"
        flag = "" if s.within_tolerance() else f" (outside {TOLERANCE:.0%}: the knobs cannot reach the target)"
        lines.append(f"{s.name}: matched on {s.matched_on}; {changed}; total {s.total / 1e6:.3f}M "
                     f"({s.total_ratio:.3f}x), active {s.active / 1e6:.3f}M ({s.active_ratio:.3f}x){flag}"
                     + (f"; {s.note}" if s.note else "") + ".")
    return lines


def size_to(m: ModelConfig, target: int, which: Literal["active", "total"] = "active") -> ModelConfig:
    """``m`` with the width ``--match`` resizes (a sparse model's ``expert_hidden``, a dense
    model's ``ffn_hidden``) set so its active (or total) parameter count is nearest ``target``;
    ``moelab search`` sizes every candidate to its budget with it. Raises ConfigError when no
    positive width reaches the target."""
    knob = "expert_hidden" if is_sparse(m) else "ffn_hidden"
    return _with(m, **{knob: _solve_one(m, knob, 0 if which == "total" else 1, target)})
