"""Expert ablation: route around one expert and measure how much the loss rises.

Legend: N tokens, K experts per token, E experts.

The model is not edited: a forward hook on the layer's router rewrites its ``Routing`` for the
tokens that chose the ablated expert. The expert keeps its slot in the token's top-k set (so no
other expert's capacity or ordering changes) but its combine weight becomes 0, and the remaining
choices are renormalised the way the layer itself normalises:

- a layer that renormalises over its top-k (``renormalize`` and k > 1; Mixtral, DeepSeek-V3's
  sigmoid router) rescales the remaining weights to the sum the k weights had, so the routed
  output keeps its scale, ``routed_scaling`` included;
- a layer that does not (Switch-style softmax weights, Qwen2-MoE without ``norm_topk_prob``)
  keeps the remaining weights as they were: its weights were never a distribution over the k.

With k = 1 nothing remains: the token gets no routed output, exactly as when capacity drops it
(the residual stream and any shared expert still carry it). A sigmoid router needs nothing
special: its bias only chose the experts, and the weights rewritten here are the unbiased scores.
Tokens that did not choose the expert keep their routing bit for bit, so ablating an expert that
receives no tokens changes the loss by exactly 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch

from moelab.config import VARIABLE_ROUTER_KINDS
from moelab.inspect.errors import InspectError
from moelab.inspect.source import Batch
from moelab.model.moe import MoE
from moelab.model.moe.router import Routing
from moelab.model.transformer import Transformer


def route_around(routing: Routing, expert: int, renormalize: bool) -> Routing:
    """``routing`` with ``expert``'s weight set to 0 in the rows that chose it, the rest of those
    rows renormalised to their previous sum when ``renormalize``."""
    hit_NK = routing.ids_NK == expert
    hit_N1 = hit_NK.any(dim=1, keepdim=True)
    w_NK = routing.weights_NK
    kept_NK = w_NK.masked_fill(hit_NK, 0.0)
    if renormalize:
        total_N1 = w_NK.sum(dim=1, keepdim=True)
        rest_N1 = kept_NK.sum(dim=1, keepdim=True)
        scale_N1 = torch.where(rest_N1 > 0, total_N1 / rest_N1.clamp_min(1e-30), torch.zeros_like(rest_N1))
        kept_NK = kept_NK * scale_N1
    return dataclasses.replace(routing, weights_NK=torch.where(hit_N1, kept_NK, w_NK))


@contextlib.contextmanager
def ablated(moe: MoE, expert: int) -> Iterator[None]:
    """While inside, ``moe`` routes around ``expert``."""
    # ReLU gates and expert choice's scores are not normalised over a token's experts
    renormalize = moe.cfg.renormalize and moe.cfg.top_k > 1 and moe.cfg.router not in VARIABLE_ROUTER_KINDS
    handle = moe.router.register_forward_hook(
        lambda module, inputs, routing: route_around(routing, expert, renormalize))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mean_loss(model: Transformer, batches: list[Batch]) -> float:
    """Token-weighted mean next-token cross-entropy over ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        n = b.x_BT.numel()
        total += float(model(b.x_BT.to(device), targets=b.y_BT.to(device)).loss) * n
        count += n
    return total / max(count, 1)


def parse_selection(spec: str) -> Optional[list[str]]:
    """``--ablate``: "all", "none", or a comma list of ``top[:N]`` (the N most loaded experts
    of each layer), ``bottom[:N]`` (the N least loaded) and expert ids. Returns the items, or
    None for "none"."""
    spec = spec.strip().lower()
    if spec == "none":
        return None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    for item in items:
        head, _, count = item.partition(":")
        ok = item == "all" or item.isdigit() or (head in ("top", "bottom") and (not count or
                                                                              (count.isdigit() and int(count) > 0)))
        if not ok:
            raise InspectError(f"--ablate = {spec!r} is invalid: give all, none, or a comma list of "
                               "top[:N], bottom[:N] and expert ids (e.g. top:2,bottom:2,5)")
    if not items:
        raise InspectError("--ablate is empty: give all, none, or e.g. top,bottom,3")
    return items


def select_experts(items: list[str], load_E: list[int]) -> list[int]:
    """The experts of one layer that ``items`` name, given that layer's loads."""
    E = len(load_E)
    order = sorted(range(E), key=lambda e: (-load_E[e], e))       # most loaded first
    chosen: set[int] = set()
    for item in items:
        head, _, count = item.partition(":")
        n = int(count) if count else 1
        if item == "all":
            chosen.update(range(E))
        elif head == "top":
            chosen.update(order[:n])
        elif head == "bottom":
            chosen.update(order[::-1][:n])
        else:
            if int(item) >= E:
                raise InspectError(f"--ablate expert {item} is out of range: a layer has {E} experts "
                                   f"(ids 0..{E - 1})")
            chosen.add(int(item))
    return sorted(chosen)


def ablation_deltas(model: Transformer, batches: list[Batch], plan: list[list[int]],
                    on_run: Optional[Callable[[], None]] = None) -> tuple[float, list[dict[int, float]]]:
    """Base loss, and per MoE layer {expert: loss with it routed around - base loss} for the
    experts ``plan`` lists (one list per MoE layer, in order)."""
    moes = model.moe_layers()
    base = mean_loss(model, batches)
    deltas: list[dict[int, float]] = []
    for moe, experts in zip(moes, plan):
        layer: dict[int, float] = {}
        for e in experts:
            with ablated(moe, e):
                layer[e] = mean_loss(model, batches) - base
            if on_run is not None:
                on_run()
        deltas.append(layer)
    return base, deltas
