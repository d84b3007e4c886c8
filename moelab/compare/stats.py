"""The one statistical rule behind every verdict of ``moelab compare``, and its small helpers.

Rule (a paired two-sided t-test at 95%): for a model against the reference, take the loss gap
``model - reference`` in each of n paired samples, its mean ``g`` and its standard error
``se = sd / sqrt(n)``. The model is "ahead" when ``g < -t * se``, "behind" when ``g > t * se`` and
"within noise" otherwise, with ``t`` the 97.5% quantile of Student's t with n - 1 degrees of
freedom (12.71 at n = 2, 4.30 at n = 3, 2.78 at n = 5, 1.96 in the limit).

The samples are the seeds when there are two or more: every model trains on the same seeds, and
a seed fixes both the initial weights and the order of the training batches, so the gaps pair up
seed by seed and the common part of the noise cancels. With one seed there is no estimate of
training noise at all; the samples are then the validation batches (every model is scored on the
same fixed batches), which measures only how noisy the evaluation itself is, a lower bound on the
real uncertainty, and the report says so.

We use t rather than the common "twice the standard error": with two seeds the standard error
rests on one degree of freedom, and 2 x se would call about one gap in three "significant" when
there is none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the finite values; None when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def sd(values: Sequence[Optional[float]]) -> Optional[float]:
    """Sample standard deviation (n - 1) of the finite values; None below two values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _t_pdf(x: np.ndarray, df: int) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


@lru_cache(maxsize=None)
def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t critical value: P(|T_df| <= t) = confidence.

    scipy is not a dependency, so the quantile comes from integrating the density (Simpson's rule
    on a fine grid) and bisecting; accurate to about 1e-4, far below what a verdict needs."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df == 1:                                          # Cauchy: closed form
        return math.tan(math.pi * confidence / 2)
    target = confidence / 2                              # mass between 0 and t

    def mass(t: float) -> float:
        xs = np.linspace(0.0, t, 4001)
        ys = _t_pdf(xs, df)
        h = xs[1] - xs[0]
        return float(h / 3 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum()))

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Verdict:
    """A gap ``model - reference`` (nats; negative = the model has the lower loss) judged by the
    rule above. ``basis`` says what the samples were: "seeds", "validation batches" or "none"
    (nothing to judge against: no verdict)."""

    gap: float
    se: Optional[float]
    threshold: Optional[float]   # t * se
    n: int
    basis: str
    verdict: str                 # "ahead" | "behind" | "within noise" | "no noise estimate"

    def public(self) -> dict:
        return dict(self.__dict__)


def judge(gaps: Sequence[float], basis: str) -> Verdict:
    """Apply the rule to paired gaps (one per seed, or one per validation batch)."""
    xs = [float(g) for g in gaps if g is not None and math.isfinite(g)]
    if not xs:
        raise ValueError("judge needs at least one finite gap")
    g = sum(xs) / len(xs)
    if len(xs) < 2:
        return Verdict(g, None, None, len(xs), "none", "no noise estimate")
    se = sd(xs) / math.sqrt(len(xs))
    threshold = t_critical(len(xs) - 1) * se
    verdict = "ahead" if g < -threshold else "behind" if g > threshold else "within noise"
    return Verdict(g, se, threshold, len(xs), basis, verdict)


def rule_text() -> str:
    return (f"paired two-sided t-test at {CONFIDENCE:.0%}: a model is ahead (behind) when its mean "
            "loss gap to the reference is below (above) -t x SE (t x SE), SE = sd of the paired "
            "gaps / sqrt(n), t = Student's t quantile with n - 1 degrees of freedom; the pairs are "
            "the seeds (same init seed and batch order for every model), or with one seed the "
            "validation batches (evaluation noise only)")
