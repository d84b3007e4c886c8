"""What experts specialise in: token ids (vocabulary) and token categories.

Legend: N tokens, K experts per token, E experts, C categories, S sampled tokens, U distinct ids.

Definitions:
- vocabulary specialisation (OLMoE, section 5.4): for each token id seen at least
  ``min_count`` times, the share of its occurrences whose first-choice (top-1) expert is that id's
  most frequent first choice; averaged over those ids. 1.0 when every id always goes to one expert,
  about 1/E for a router that ignores the token. The top-1 choice is used so the measure has the
  same range for every k. Its chance level is simulated: the same per-id counts drawn from the
  layer's own top-1 marginal, so small counts' sampling noise is not mistaken for specialisation.
- lift of a token for an expert: P(e in top-k | token) / P(e in top-k); the tokens with the
  highest lift are what an expert is for, relative to its overall traffic.
- category share: the fraction of a category's tokens that have expert e in their top-k set;
  chance is the uniform rate k/E.
- category specialisation: the mutual information (bits) between a token's category and the
  experts it is routed to (each of its k assignments one observation), against the same statistic
  with categories randomly permuted over the same tokens (a permutation test: it keeps both
  marginals and breaks only their association).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

MIN_TOKEN_COUNT = 10          # OLMoE 5.4: token ids seen at least this often
MIN_PENDING = 1 << 16         # PairCounts merges once pending pairs reach max(this, stored)
PERMUTATIONS = 20


class PairCounts:
    """Counts of (token id, expert) pairs, stored sparsely: a vocabulary of 150k ids times 128
    experts would be 19M counters per layer, while the pairs a run actually sees are far fewer.
    New pairs wait in a list and are merged once they outnumber the stored ones, so memory stays
    within about twice the distinct pairs seen and each pair is sorted O(log) times."""

    def __init__(self, num_experts: int):
        self.E = num_experts
        self.keys = torch.zeros(0, dtype=torch.long)       # token * E + expert, sorted, unique
        self.counts = torch.zeros(0, dtype=torch.long)
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0

    def add(self, tokens_N: torch.Tensor, experts_NK: torch.Tensor, mask_NK: Optional[torch.Tensor] = None) -> None:
        keys_NK = tokens_N.long().unsqueeze(1) * self.E + experts_NK.long()
        keys = (keys_NK.flatten() if mask_NK is None else keys_NK[mask_NK]).cpu()
        self._pending.append(keys)
        self._pending_n += keys.numel()
        if self._pending_n >= max(MIN_PENDING, len(self.keys)):
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        new = torch.cat(self._pending)
        keys = torch.cat([self.keys, new])
        weights = torch.cat([self.counts, torch.ones_like(new)])
        self.keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self.counts = torch.zeros_like(self.keys).scatter_add_(0, inverse, weights)
        self._pending, self._pending_n = [], 0

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, experts, counts), each (pairs,), sorted by token then expert."""
        self._compact()
        keys = self.keys.numpy()
        return keys // self.E, keys % self.E, self.counts.numpy()


@dataclass
class VocabSpecialization:
    mean: float            # mean over frequent ids of the share sent to their top expert
    chance: float          # the same for counts drawn from the layer's top-1 marginal
    num_ids: int           # frequent token ids measured
    ids: np.ndarray        # (U,) frequent ids
    totals: np.ndarray     # (U,) occurrences of each
    top_expert: np.ndarray  # (U,) its most frequent first choice
    share: np.ndarray      # (U,) share of occurrences sent there


def vocab_specialization(top1: PairCounts, min_count: int = MIN_TOKEN_COUNT,
                         seed: int = 0) -> VocabSpecialization:
    tokens, experts, counts = top1.table()
    ids, inverse = np.unique(tokens, return_inverse=True)
    totals = np.bincount(inverse, weights=counts).astype(np.int64)           # (U,)
    best = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(best, inverse, counts)
    # the expert holding the max (lowest id on ties): first pair of each id that reaches it
    is_best = counts == best[inverse]
    top_expert = np.full(len(ids), -1, dtype=np.int64)
    for u, e in zip(inverse[is_best][::-1], experts[is_best][::-1]):
        top_expert[u] = e
    keep = totals >= min_count
    share = best[keep] / np.maximum(totals[keep], 1)
    marginal = np.bincount(experts, weights=counts, minlength=top1.E)
    chance = _chance_max_share(totals[keep], marginal, seed)
    return VocabSpecialization(mean=float(share.mean()) if keep.any() else float("nan"),
                               chance=chance, num_ids=int(keep.sum()), ids=ids[keep],
                               totals=totals[keep], top_expert=top_expert[keep], share=share)


def _chance_max_share(totals_U: np.ndarray, marginal_E: np.ndarray, seed: int) -> float:
    """Expected mean max-share when each id's occurrences pick experts from ``marginal_E``."""
    if len(totals_U) == 0 or marginal_E.sum() == 0:
        return float("nan")
    p = marginal_E / marginal_E.sum()
    draws_UE = np.random.default_rng(seed).multinomial(totals_U, p)           # (U, E)
    return float((draws_UE.max(axis=1) / totals_U).mean())


def top_lift_tokens(topk: PairCounts, vocab: VocabSpecialization, expert_totals_E: np.ndarray,
                    num_tokens: int, per_expert: int = 8) -> list[list[tuple[int, float, int]]]:
    """Per expert, up to ``per_expert`` (token id, lift, times routed there) among the frequent
    ids of ``vocab``, highest lift first (ties: more traffic first)."""
    tokens, experts, counts = topk.table()
    pos = np.clip(np.searchsorted(vocab.ids, tokens), 0, max(len(vocab.ids) - 1, 0))
    keep = (vocab.ids[pos] == tokens) if len(vocab.ids) else np.zeros(len(tokens), dtype=bool)
    totals = np.where(keep, vocab.totals[pos] if len(vocab.ids) else 0, 1).astype(np.float64)
    p_e = expert_totals_E / max(num_tokens, 1)                                # P(e in top-k)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = (counts / totals) / p_e[experts]
    out: list[list[tuple[int, float, int]]] = []
    for e in range(topk.E):
        sel = np.nonzero(keep & (experts == e))[0]
        order = sel[np.lexsort((-counts[sel], -lift[sel]))][:per_expert]
        out.append([(int(tokens[i]), float(lift[i]), int(counts[i])) for i in order])
    return out


def category_share(cat_CE: np.ndarray, cat_tokens_C: np.ndarray) -> np.ndarray:
    """(C, E): fraction of each category's tokens with e in their top-k set (rows sum to k)."""
    return cat_CE / np.maximum(cat_tokens_C, 1)[:, None]


def mutual_information_bits(table_CE: np.ndarray) -> float:
    """I(category; expert) in bits from a contingency table of counts."""
    total = table_CE.sum()
    if total == 0:
        return 0.0
    p = table_CE / total
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())


@dataclass
class CategoryTest:
    mi_bits: float           # on the sample
    category_bits: float     # H(category) on the sample: the most I could be
    chance_bits: float       # mean over permutations
    chance_std_bits: float
    ratio: float             # mi / chance
    z: float                 # (mi - chance) / std
    sample_tokens: int

    @property
    def fraction(self) -> float:
        """I / H(category): the share of a token's category that its experts give away."""
        return self.mi_bits / self.category_bits if self.category_bits > 0 else 0.0

    @property
    def specialised(self) -> bool:
        """More specialised than chance: above every permutation by a clear margin (z > 3)."""
        return self.z > 3.0


def category_test(cat_S: np.ndarray, ids_SK: np.ndarray, num_categories: int, num_experts: int,
                  permutations: int = PERMUTATIONS, seed: int = 0) -> CategoryTest:
    """Mutual information between category and expert on S tokens, against ``permutations``
    random relabellings of the same tokens."""
    C, E = num_categories, num_experts

    used = ids_SK >= 0             # variable routers: -1 marks an expert the token did not use

    def mi(cats: np.ndarray) -> float:
        keys = (cats[:, None] * E + ids_SK)[used]
        return mutual_information_bits(np.bincount(keys, minlength=C * E).reshape(C, E))

    rng = np.random.default_rng(seed)
    observed = mi(cat_S)
    null = np.array([mi(rng.permutation(cat_S)) for _ in range(permutations)])
    chance, std = float(null.mean()), float(null.std(ddof=1)) if permutations > 1 else 0.0
    p_C = np.bincount(cat_S, minlength=C) / max(len(cat_S), 1)
    h_C = float(-(p_C[p_C > 0] * np.log2(p_C[p_C > 0])).sum())
    return CategoryTest(mi_bits=observed, category_bits=h_C, chance_bits=chance, chance_std_bits=std,
                        ratio=observed / chance if chance > 0 else float("inf"),
                        z=(observed - chance) / std if std > 0 else float("inf"),
                        sample_tokens=len(cat_S))


def strongest_category(share_CE: np.ndarray, cat_tokens_C: np.ndarray, names: tuple[str, ...],
                       uniform: float, min_tokens: int = 100):
    """(category, expert, share, share / uniform) of the largest over-representation among
    categories with at least ``min_tokens`` tokens, or None."""
    best = None
    for c, name in enumerate(names):
        if cat_tokens_C[c] < min_tokens:
            continue
        e = int(share_CE[c].argmax())
        lift = float(share_CE[c, e] / uniform)
        if best is None or lift > best[3]:
            best = (name, e, float(share_CE[c, e]), lift)
    return best
