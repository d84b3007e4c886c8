"""Which experts are chosen together: within a layer, and from one MoE layer to the next.

Legend: N tokens, K experts per token, E experts (Ea, Eb in two layers).

Counts come from the membership matrix M (N, E), M[n, e] = 1 when e is in token n's top-k set:
M^T M counts, for every pair (i, j), the tokens whose top-k set holds both (all pairs of the set,
so each token adds K(K-1) off-diagonal counts), with N(Ei) on the diagonal. OLMoE's co-activation
(Eq. 6) is N(Ei, Ej) / N(Ei), read along a row. Between consecutive MoE layers the same product of
the two layers' memberships counts which expert in layer l+1 follows which in layer l.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def membership(ids_NK: torch.Tensor, num_experts: int, mask_NK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, E) float32 0/1: expert e is among token n's choices (those ``mask_NK`` keeps, for
    routers whose tokens use a varying number of experts)."""
    m = torch.zeros(ids_NK.shape[0], num_experts, dtype=torch.float32, device=ids_NK.device)
    if mask_NK is None:
        return m.scatter_(1, ids_NK.long(), 1.0)
    return m.scatter_(1, ids_NK.long(), mask_NK.float())


def _count(a_NE: torch.Tensor, b_NE: torch.Tensor) -> torch.Tensor:
    # float32 products of 0/1 are exact up to 2^24 tokens per call; batches are far smaller
    return (a_NE.T @ b_NE).round().long().cpu()


def coactivation_counts(ids_NK: torch.Tensor, num_experts: int,
                        mask_NK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E, E) int64, symmetric: [i, j] = tokens choosing both i and j; [i, i] = tokens choosing i."""
    m = membership(ids_NK, num_experts, mask_NK)
    return _count(m, m)


def transition_counts(ids_a_NK: torch.Tensor, ids_b_NK: torch.Tensor, experts_a: int,
                      experts_b: int, mask_a_NK: Optional[torch.Tensor] = None,
                      mask_b_NK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Ea, Eb) int64: [i, j] = tokens with i in layer a's set and j in layer b's."""
    return _count(membership(ids_a_NK, experts_a, mask_a_NK), membership(ids_b_NK, experts_b, mask_b_NK))


def coactivation_ratio(counts_EE: np.ndarray) -> np.ndarray:
    """(E, E): N(Ei, Ej) / N(Ei) (OLMoE Eq. 6); the diagonal is left at 0."""
    counts = np.asarray(counts_EE, dtype=np.float64)
    ratio = counts / np.maximum(np.diag(counts), 1)[:, None]
    np.fill_diagonal(ratio, 0.0)
    return ratio


def strongest_pairs(ratio_EE: np.ndarray, n: int = 3) -> list[tuple[int, int, float]]:
    """The ``n`` largest off-diagonal co-activation ratios as (i, j, ratio)."""
    flat = np.argsort(-ratio_EE, axis=None)[:n]
    E = ratio_EE.shape[0]
    return [(int(f // E), int(f % E), float(ratio_EE.flat[f])) for f in flat if ratio_EE.flat[f] > 0]
