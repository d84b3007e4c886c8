"""Expert load: how many tokens each expert received, against its fair share.

Legend: E experts.

Normalised load is DeepSeek-V3's measure: an expert's load divided by the ideal load, the load
every expert would carry under perfect balance (tokens x k / E), so 1.0 is balanced, 0 is dead
and 2.0 carries twice its share. Loads count the assignments an expert actually ran, after any
capacity drops.
"""

from __future__ import annotations

import numpy as np

OVERLOADED = 2.0     # normalised load at or above which an expert is called overloaded


def ideal_load(num_tokens: int, top_k: int, num_experts: int) -> float:
    return num_tokens * top_k / num_experts


def load_summary(tokens_per_expert_E: np.ndarray, num_tokens: int, top_k: int) -> dict:
    load = np.asarray(tokens_per_expert_E, dtype=np.int64)
    E = len(load)
    norm = load / ideal_load(num_tokens, top_k, E) if num_tokens else np.zeros(E)
    share = load / max(load.sum(), 1)
    nz = share > 0
    return {
        "tokens_per_expert": load.tolist(),
        "normalized_load": [round(float(x), 6) for x in norm],
        "dead_experts": np.nonzero(load == 0)[0].tolist(),
        "overloaded_experts": np.nonzero(norm >= OVERLOADED)[0].tolist(),
        "max_normalized_load": float(norm.max()) if E else 0.0,
        "min_normalized_load": float(norm.min()) if E else 0.0,
        "load_cv": float(load.std() / max(load.mean(), 1e-12)),
        # entropy of the load distribution, as a fraction of its maximum log(E): 1 = balanced
        "load_balance": float(-(share[nz] * np.log(share[nz])).sum() / np.log(E)) if E > 1 else 1.0,
    }
