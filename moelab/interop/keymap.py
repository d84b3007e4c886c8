"""Declarative key maps between moelab state dicts and Hugging Face checkpoints, plus the few
explicit tensor transforms they need (torchtitan's ``state_dict_adapter.py`` idea, both ways).

Legend: D width, H query heads, G key/value heads, Dh head dim, E experts, F expert hidden,
Dr RoPE dim (MLA), R latent rank.

A :class:`Rule` says "our tensor ``ours`` is made of the HF tensors ``hf`` by ``transform``". Layer
rules are written relative to ``blocks.{i}.`` (ours) and ``model.layers.{i}.`` (HF). HF keys may
hold ``{e}`` (expert index): the checkpoint layout on the Hub stores one tensor per expert, while a
transformers 5 module keeps them fused as ``(E, 2F, D)`` / ``(E, D, F)`` parameters, the same
layout as ours; ``module`` names that fused key so the same rule serves both layouts:

- layout "checkpoint": files written by ``save_pretrained`` and read by ``from_pretrained``;
- layout "module": ``hf_model.state_dict()`` of a live transformers 5 model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

from moelab.config import ModelConfig
from moelab.interop.errors import InteropError
from moelab.model.weights import describe_mismatch

Layout = Literal["checkpoint", "module"]


@dataclass(frozen=True)
class Ctx:
    """What a transform may need: the model config, the layer, and family flags."""

    cfg: ModelConfig
    layer: int = -1
    rope_interleave: bool = False

    @property
    def experts(self) -> int:
        return self.cfg.experts_in_layer(self.layer)


# ---------------------------------------------------------------------------------------------
# transforms: HF tensors (a list) <-> our tensor
# ---------------------------------------------------------------------------------------------

class Same:
    """One HF tensor is our tensor."""

    def keys(self, hf: Sequence[str], ctx: Ctx) -> list[str]:
        return list(hf)

    def to_ours(self, parts: list[torch.Tensor], ctx: Ctx) -> torch.Tensor:
        return parts[0]

    def to_hf(self, t: torch.Tensor, ctx: Ctx) -> list[torch.Tensor]:
        return [t]


@dataclass(frozen=True)
class Concat(Same):
    """Ours is the HF tensors concatenated along rows (dim 0): q|k|v, gate|up. ``sizes`` gives
    the row counts for the way back; None splits into equal parts."""

    sizes: Optional[Callable[[Ctx], list[int]]] = None

    def to_ours(self, parts, ctx):
        return torch.cat(parts, dim=0)

    def to_hf(self, t, ctx):
        if self.sizes is None:
            return list(t.chunk(2, dim=0))
        return list(t.split(self.sizes(ctx), dim=0))


@dataclass(frozen=True)
class Experts(Same):
    """Ours is (E, ·, ·): expert ``e`` is its ``parts`` HF tensors (``{e}`` filled in) concatenated
    along rows: 2 for gate|up (E, 2F, D), 1 for down (E, D, F). In the module layout the HF tensor
    is already stacked like ours."""

    parts: int = 1

    def keys(self, hf, ctx):
        return [k.format(e=e) for e in range(ctx.experts) for k in hf]

    def to_ours(self, parts, ctx):
        n = self.parts
        return torch.stack([torch.cat(parts[e * n:(e + 1) * n], dim=0) for e in range(ctx.experts)])

    def to_hf(self, t, ctx):
        return [p for e in range(t.shape[0]) for p in t[e].chunk(self.parts, dim=0)]


@dataclass(frozen=True)
class RopeRows(Same):
    """DeepSeek-V3's ``rope_interleave``: HF rotates the pairs (0,1), (2,3), ... of the RoPE part;
    we rotate the halves (Llama's rotate_half). Rotating pairs equals rotating halves after the
    permutation [0, 2, 4, ..., 1, 3, 5, ...] of those dims, and attention scores are dot products,
    so permuting the RoPE rows of the query and key projections turns one into the other exactly.
    ``rows(ctx)`` gives the row indices of the RoPE dims, in groups of Dr (one group per head)."""

    rows: Callable[[Ctx], torch.Tensor]

    def _perm(self, n_rows: int, ctx: Ctx, inverse: bool) -> torch.Tensor:
        Dr = ctx.cfg.mla.qk_rope_head_dim
        half_order = torch.cat([torch.arange(0, Dr, 2), torch.arange(1, Dr, 2)])      # (Dr,)
        if inverse:
            half_order = torch.argsort(half_order)
        perm = torch.arange(n_rows)
        rope_rows = self.rows(ctx).view(-1, Dr)                                         # (groups, Dr)
        perm[rope_rows.flatten()] = rope_rows[:, half_order].flatten()
        return perm

    def to_ours(self, parts, ctx):
        t = parts[0]
        return t[self._perm(t.shape[0], ctx, inverse=False)] if ctx.rope_interleave else t

    def to_hf(self, t, ctx):
        return [t[self._perm(t.shape[0], ctx, inverse=True)] if ctx.rope_interleave else t]


@dataclass(frozen=True)
class ZeroBuffer(Same):
    """A buffer of ours that the family does not have (the router's balancing bias outside
    DeepSeek-V3): zeros on import; on export it must be all zeros, or the family cannot
    express the model's expert choices."""

    def keys(self, hf, ctx):
        return []

    def to_ours(self, parts, ctx):
        return torch.zeros(ctx.experts)

    def to_hf(self, t, ctx):
        if torch.count_nonzero(t):
            raise InteropError(
                f"layer {ctx.layer}: the router's expert_bias is non-zero (aux-loss-free balancing), "
                "which shifts expert choices; this family's router has no such bias")
        return []


@dataclass(frozen=True)
class Dropped(Same):
    """A training-only tensor of ours with no HF counterpart (the noisy router's noise weight):
    left out on export, never produced on import."""

    def keys(self, hf, ctx):
        return []

    def to_ours(self, parts, ctx):
        raise InteropError("a training-only tensor cannot be imported")

    def to_hf(self, t, ctx):
        return []


SAME = Same()


@dataclass(frozen=True)
class Rule:
    ours: str                     # our key (layer rules: after "blocks.{i}.")
    hf: tuple[str, ...]           # checkpoint keys (layer rules: after "model.layers.{i}.")
    transform: Same = SAME
    module: Optional[str] = None  # the live transformers module's key, when it differs (fused experts)


@dataclass(frozen=True)
class KeyMap:
    """All rules of one family: ``top`` for whole-model tensors, ``layer`` for per-block ones."""

    top: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    layer_prefix: str = "model.layers.{i}."
    # checkpoint keys a family may carry that hold no part of the model we run (regexes)
    ignore: tuple[str, ...] = ()

    def rule(self, our_key: str) -> tuple[Rule, int]:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", our_key)
        rules, name, layer = (self.layer, m.group(2), int(m.group(1))) if m else (self.top, our_key, -1)
        for r in rules:
            if r.ours == name:
                return r, layer
        raise InteropError(f"no Hugging Face name for our tensor {our_key!r} in this family")

    def hf_keys(self, rule: Rule, ctx: Ctx, layout: Layout) -> list[str]:
        prefix = self.layer_prefix.format(i=ctx.layer) if ctx.layer >= 0 else ""
        if layout == "module" and rule.module is not None:
            return [prefix + rule.module]
        return [prefix + k for k in rule.transform.keys(rule.hf, ctx)]


# ---------------------------------------------------------------------------------------------
# the two directions
# ---------------------------------------------------------------------------------------------

def _fused(rule: Rule, layout: Layout) -> bool:
    return layout == "module" and rule.module is not None


def hf_to_ours(keymap: KeyMap, cfg: ModelConfig, expected: dict[str, torch.Size],
               available: set[str], get: Callable[[str], torch.Tensor], *,
               layout: Layout = "checkpoint", rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    """Build our state dict (keys and shapes ``expected``) from HF tensors.

    ``available`` are the HF keys present, ``get`` loads one. Every missing, mis-shaped or left-over
    HF tensor is collected and reported together with its name and shape."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, wrong = [], []
    for our_key, shape in expected.items():
        rule, layer = keymap.rule(our_key)
        ctx = Ctx(cfg, layer, rope_interleave)
        keys = keymap.hf_keys(rule, ctx, layout)
        absent = [k for k in keys if k not in available]
        if absent:
            missing += absent
            continue
        used.update(keys)
        parts = [get(k) for k in keys]
        t = parts[0] if _fused(rule, layout) else rule.transform.to_ours(parts, ctx)
        if tuple(t.shape) != tuple(shape):
            got = ", ".join(f"{k} {tuple(p.shape)}" for k, p in zip(keys[:4], parts[:4]))
            wrong.append(f"{our_key} needs {tuple(shape)} from [{got}{' ...' if len(keys) > 4 else ''}]")
            continue
        out[our_key] = t
    unexpected = sorted(k for k in available - used if not any(re.fullmatch(p, k) for p in keymap.ignore))
    problem = describe_mismatch(missing, unexpected, wrong, limit=6)
    if problem:
        raise InteropError("the checkpoint does not match its config.json: " + problem)
    return out


def ours_to_hf(keymap: KeyMap, cfg: ModelConfig, state: dict[str, torch.Tensor], *,
               layout: Layout = "checkpoint", rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    """HF tensors (checkpoint or module layout) from our state dict."""
    out: dict[str, torch.Tensor] = {}
    for our_key, t in state.items():
        rule, layer = keymap.rule(our_key)
        ctx = Ctx(cfg, layer, rope_interleave)
        keys = keymap.hf_keys(rule, ctx, layout)
        parts = [t] if _fused(rule, layout) else rule.transform.to_hf(t, ctx)
        for k, p in zip(keys, parts, strict=True):
            out[k] = p.contiguous()
    return out
