"""A candidate architecture: a layer pattern with its experts, as a model config sized to the
budget, and the fixed patterns the best candidate is retrained against.

Sizing is `moelab compare --match active`'s (``matching.size_to``): the one width that sets a
model's active parameters (a sparse model's ``expert_hidden``, shared experts included when they
take its width; a dense model's ``ffn_hidden``) is solved so the candidate has the base model's
active parameters. Dense layers keep the base model's FFN width. A candidate further than
``TOLERANCE`` from the budget after sizing (widths are whole numbers) is not trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from moelab.accounting import param_counts
from moelab.config import Config, ConfigError, ModelConfig

TOLERANCE = 0.02        # every trained candidate is within 2% of the budget's active parameters


class Infeasible(ConfigError):
    """The candidate cannot be built at this budget (the message says why)."""


@dataclass(frozen=True)
class Candidate:
    moe_layers: tuple[int, ...]             # layer indices with an MoE FFN, increasing
    experts: tuple[int, ...]                # routed experts per MoE layer (after granularity)
    top_k: int                              # experts per token (after granularity)
    granularity: int = 1                    # experts split g ways (DeepSeekMoE); 1 = unsplit
    shared_experts: int = 0

    @property
    def dense(self) -> bool:
        return not self.moe_layers

    def key(self) -> tuple:
        """What makes two candidates the same model (an all-dense one ignores its expert knobs)."""
        if self.dense:
            return ()
        return (self.moe_layers, self.experts, self.top_k, self.shared_experts)

    def public(self) -> dict:
        return {"moe_layers": list(self.moe_layers), "experts_per_layer": list(self.experts),
                "top_k": None if self.dense else self.top_k,
                "granularity": None if self.dense else self.granularity,
                "shared_experts": None if self.dense else self.shared_experts}

    def unsized(self, base: ModelConfig) -> ModelConfig:
        """The base model with this pattern; expert width a first guess that sizing replaces."""
        if self.dense:
            return dataclasses.replace(base, moe=dataclasses.replace(
                base.moe, layers="none", num_experts_per_layer=None))
        moe = dataclasses.replace(
            base.moe, layers=self.moe_layers, every=1, first_dense=0, num_experts=max(self.experts),
            num_experts_per_layer=self.experts, top_k=self.top_k, num_shared_experts=self.shared_experts,
            expert_hidden=max(1, base.ffn_hidden // (self.top_k + self.shared_experts)))
        return dataclasses.replace(base, moe=moe)


def describe_row(c: Candidate, n_layers: int) -> str:
    """The pattern as a row of cells: '.' a dense layer, the expert count for an MoE layer."""
    cells = []
    for i in range(n_layers):
        cells.append(str(c.experts[c.moe_layers.index(i)]) if i in c.moe_layers else ".")
    return " ".join(cells)


def size(base: Config, cand: Candidate, target_active: int) -> Config:
    """``base`` with ``cand``'s pattern, resized to ``target_active`` active parameters and
    validated; Infeasible names what went wrong."""
    from moelab.compare.matching import size_to
    try:
        model = size_to(cand.unsized(base.model), target_active, "active")
        cfg = dataclasses.replace(base, model=model).validate_for_training()
    except ConfigError as e:
        raise Infeasible(f"cannot size {cand.public()} to {target_active:,} active parameters: "
                         f"{str(e).replace('--match: ', '')}") from None
    active = param_counts(cfg.model)["active"]
    if abs(active / target_active - 1) > TOLERANCE:
        raise Infeasible(f"{cand.public()} sized to {active:,} active parameters, more than "
                         f"{TOLERANCE:.0%} from the budget's {target_active:,}")
    return cfg


def model_overrides(base: ModelConfig, sized: ModelConfig) -> list[str]:
    """``--set`` overrides that turn ``base`` into ``sized`` (model keys only)."""
    from moelab.config_files import toml_value
    out = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key, after in b.items():
            before = a[key]
            if isinstance(after, dict):
                walk(before, after, f"{prefix}{key}.")
            elif before != after:
                out.append(f"{prefix}{key}=" + ("none" if after is None else toml_value(after)))

    walk(dataclasses.asdict(base), dataclasses.asdict(sized), "model.")
    return out


def fixed_patterns(base: ModelConfig) -> dict[str, Candidate]:
    """The hand-made layouts the best candidate is judged against, with the base config's expert
    settings (count, top-k, shared experts) and the same budget: all-dense, all-MoE, every other
    layer (the `hybrid` preset's layout, GLaM/Switch interleaving), MoE in the first or the last
    half of the layers, and a pyramid (DeepSpeed PR-MoE, Rajbhandari et al. 2022: every layer MoE,
    twice the experts in the second half, as its 32 -> 64 experts)."""
    L, m = base.n_layers, base.moe
    E, k, s = m.num_experts, min(m.top_k, m.num_experts), m.num_shared_experts

    def sparse(layers, counts=None) -> Candidate:
        layers = tuple(layers)
        if not layers:
            return Candidate((), (), k, 1, s)
        return Candidate(layers, tuple(counts or [E] * len(layers)), k, 1, s)

    half = L // 2
    return {
        "all-dense": Candidate((), (), k, 1, s),
        "all-moe": sparse(range(L)),
        "every-other": sparse(range(1, L, 2)),
        "first-half": sparse(range(half)),
        "last-half": sparse(range(L - half, L)),
        "pyramid": sparse(range(L), [E] * (L - half) + [2 * E] * half),
    }


def check_space(base: Config, space, target_active: int) -> None:
    """Refuse, before any trial, a space with combinations this base model cannot build (every
    expert count, top-k, granularity and shared-expert choice, on an all-MoE layout)."""
    import itertools
    L = base.model.n_layers
    for e, k, g, s in itertools.product(space.experts, space.top_k, space.granularity, space.shared_experts):
        cand = Candidate(tuple(range(L)), (e * g,) * L, k * g, g, s)
        try:
            size(base, cand, target_active)
        except Infeasible as err:
            raise ConfigError(f"--space: experts={e}, top_k={k}, granularity={g}, shared_experts={s} "
                              f"cannot be built on this base model ({err}); narrow the space") from None


def target_of(base: Config) -> int:
    return param_counts(base.model)["active"]


def counts(cfg: Config) -> tuple[int, int]:
    c = param_counts(cfg.model)
    return c["total"], c["active"]


def width_fraction(cfg: Config) -> Optional[float]:
    """A sparse model's expert width over the base dense FFN width (None for a dense model)."""
    if not cfg.model.moe_layer_indices():
        return None
    return cfg.model.moe.expert_hidden / cfg.model.ffn_hidden
