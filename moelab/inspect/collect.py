"""One pass over the tokens: every MoE layer's choices, accumulated batch by batch.

Legend: N tokens in a batch, K experts per token, E experts, C categories, S sampled tokens.

The model reports each MoE layer's choices in ``ModelOutput.router_stats[i].expert_ids`` (N, K),
first choice first, and the assignments each expert actually ran (after capacity drops) in
``tokens_per_expert``. Only counts are kept between batches (per-layer vectors and matrices, and
sparse (token id, expert) pairs), so memory does not grow with the number of tokens; the one
exception is a capped sample (the first ``sample_limit`` tokens, fewer for deep models with large
k) kept for the permutation test of category specialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from moelab.config import VARIABLE_ROUTER_KINDS
from moelab.inspect.coactivation import coactivation_counts, membership, transition_counts
from moelab.inspect.source import Batch
from moelab.inspect.specialization import PairCounts
from moelab.model.transformer import Transformer

SAMPLE_LIMIT = 1 << 18      # tokens kept for the category permutation test ...
SAMPLE_ENTRIES = 1 << 24    # ... and at most this many kept expert ids over all layers (32 MB)


@dataclass
class LayerCounts:
    layer: int                         # block index of this MoE layer
    num_experts: int
    kept_E: torch.Tensor               # assignments each expert ran (after drops)
    chosen_E: torch.Tensor             # assignments the router chose (before drops)
    coact_EE: torch.Tensor             # membership co-occurrence counts
    cat_CE: torch.Tensor               # category x expert membership counts
    top1: PairCounts                   # (token id, first-choice expert)
    topk: PairCounts                   # (token id, any chosen expert)
    next_EF: Optional[torch.Tensor] = None   # transitions to the next MoE layer (F its experts)
    entropy_sum: float = 0.0           # router entropy x tokens
    dropped_sum: float = 0.0           # dropped fraction x tokens
    saturation_top1: int = 0           # tokens whose first choice matches the --against model's
    saturation_overlap: int = 0        # assignments shared with the --against model's top-k sets
    sample_ids: list[torch.Tensor] = field(default_factory=list)   # (S, K) pieces


@dataclass
class Collected:
    layers: list[LayerCounts]
    tokens: int
    top_k: int
    loss_sum: float                    # next-token cross-entropy x tokens
    cat_tokens_C: np.ndarray           # tokens per category
    sample_cats: np.ndarray            # (S,) categories of the sampled tokens
    has_categories: bool
    against: bool

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    def sample_ids(self, i: int) -> np.ndarray:
        """(S, K) choices of layer ``i`` for the sampled tokens."""
        if not self.layers[i].sample_ids:
            return np.zeros((0, self.top_k), dtype=np.int64)
        return torch.cat(self.layers[i].sample_ids).numpy().astype(np.int64)


def moe_layout(model: Transformer) -> list[tuple[int, int]]:
    """(block index, experts) of each MoE layer, in order."""
    cfg = model.config
    return [(i, cfg.experts_in_layer(i)) for i in cfg.moe_layer_indices()]


@torch.no_grad()
def collect(model: Transformer, batches: Iterable[Batch], *, num_categories: int = 0,
            against: Optional[Transformer] = None, sample_limit: int = SAMPLE_LIMIT,
            on_tokens: Optional[Callable[[int], None]] = None) -> Collected:
    """Route every batch through ``model`` (and ``against``, for router saturation) once."""
    layout = moe_layout(model)
    K = model.config.moe.top_k
    width = max(E for _, E in layout) if model.config.moe.router in VARIABLE_ROUTER_KINDS else K
    sample_limit = min(sample_limit, SAMPLE_ENTRIES // max(1, len(layout) * width))
    C = max(num_categories, 1)
    layers = [LayerCounts(layer=l, num_experts=E, kept_E=torch.zeros(E, dtype=torch.long),
                          chosen_E=torch.zeros(E, dtype=torch.long),
                          coact_EE=torch.zeros(E, E, dtype=torch.long),
                          cat_CE=torch.zeros(C, E, dtype=torch.long),
                          top1=PairCounts(E), topk=PairCounts(E)) for l, E in layout]
    for a, b in zip(layers, layers[1:]):
        a.next_EF = torch.zeros(a.num_experts, b.num_experts, dtype=torch.long)
    cat_tokens = torch.zeros(C, dtype=torch.long)
    sample_cats: list[torch.Tensor] = []
    sampled, tokens, loss_sum = 0, 0, 0.0
    device = next(model.parameters()).device

    for batch in batches:
        x, y = batch.x_BT.to(device), batch.y_BT.to(device)
        out = model(x, targets=y)
        N = x.numel()
        loss_sum += float(out.loss) * N
        ids = [s.expert_ids for s in out.router_stats]                       # each (N, K)
        # variable routers (relu, expert_choice): ids are (N, E) and the mask says which were used
        masks = [s.expert_mask for s in out.router_stats]
        other = [s.expert_ids for s in against(x, targets=y).router_stats] if against is not None else None
        tokens_N = x.flatten()
        cats_N = batch.cat_BT.flatten().to(device) if batch.cat_BT is not None and num_categories else None
        take = min(N, sample_limit - sampled)
        if cats_N is not None:
            cat_tokens += torch.bincount(cats_N, minlength=C).cpu()
            if take > 0:
                sample_cats.append(cats_N[:take].cpu())
        for i, (lc, st) in enumerate(zip(layers, out.router_stats)):
            E = lc.num_experts
            ids_NK, mask_NK = ids[i], masks[i]
            lc.kept_E += st.tokens_per_expert.long().cpu()
            used = ids_NK.flatten() if mask_NK is None else ids_NK[mask_NK]
            lc.chosen_E += torch.bincount(used, minlength=E).cpu()
            lc.coact_EE += coactivation_counts(ids_NK, E, mask_NK)
            lc.top1.add(tokens_N, ids_NK[:, :1], None if mask_NK is None else mask_NK[:, :1])
            lc.topk.add(tokens_N, ids_NK, mask_NK)
            lc.entropy_sum += float(st.entropy) * N
            lc.dropped_sum += float(st.dropped_fraction) * N
            if cats_N is not None:
                cat_NC = torch.zeros(N, C, device=device).scatter_(1, cats_N[:, None], 1.0)
                lc.cat_CE += (cat_NC.T @ membership(ids_NK, E, mask_NK)).round().long().cpu()
            if lc.next_EF is not None:
                nxt = layers[i + 1]
                lc.next_EF += transition_counts(ids_NK, ids[i + 1], E, nxt.num_experts, mask_NK, masks[i + 1])
            if other is not None:
                lc.saturation_top1 += int((ids_NK[:, 0] == other[i][:, 0]).sum())
                lc.saturation_overlap += int((ids_NK[:, :, None] == other[i][:, None, :]).any(-1).sum())
            if take > 0:
                sample = ids_NK[:take] if mask_NK is None else ids_NK[:take].masked_fill(~mask_NK[:take], -1)
                lc.sample_ids.append(sample.to(torch.int16).cpu())   # E <= 32767
        sampled += max(take, 0)
        tokens += N
        if on_tokens is not None:
            on_tokens(N)

    return Collected(layers=layers, tokens=tokens, top_k=K, loss_sum=loss_sum,
                     cat_tokens_C=cat_tokens.numpy(),
                     sample_cats=torch.cat(sample_cats).numpy() if sample_cats else np.zeros(0, np.int64),
                     has_categories=num_categories > 0, against=against is not None)
