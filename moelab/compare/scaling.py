"""Loss against training tokens: the fit loss(D) = E + A * D^-alpha and where two curves cross.

The form is the data term of Chinchilla's parametric loss (Hoffmann et al. 2022) at a fixed model
size: an irreducible loss E plus a power law in tokens D. scipy is not a dependency, and with
alpha fixed the other two are a linear least-squares problem, so we scan alpha on a log grid,
solve (E, A) in closed form at each point, and refine the best alpha by golden-section search.
Fits with A <= 0, or whose power-law term vanishes (loss that does not fall with more tokens),
are refused rather than reported.

A crossover is the token budget at which a sparse model's loss drops below the dense model's:
measured when the mean gap changes sign between two trained budgets (interpolated linearly in
log D), otherwise read from the two fitted curves outside the trained range, up to
``EXTRAPOLATE_FACTOR`` times beyond it. Extrapolations carry the spread of the same computation
repeated on each seed's own losses (seed s trains at every budget, so its points form a curve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

ALPHA_RANGE = (1e-3, 3.0)
EXTRAPOLATE_FACTOR = 1000.0        # look for crossings up to 1000x beyond the trained budgets
MIN_POINTS = 3                     # three parameters need three budgets


@dataclass(frozen=True)
class PowerLaw:
    E: float
    A: float
    alpha: float
    rmse: float

    def __call__(self, tokens):
        return self.E + self.A * np.power(np.asarray(tokens, dtype=np.float64), -self.alpha)

    def public(self) -> dict:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "rmse": self.rmse}


def _solve(tokens: np.ndarray, losses: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(E, A, sum of squared residuals) of the least-squares fit at a fixed alpha."""
    x = np.power(tokens, -alpha)
    X = np.stack([np.ones_like(x), x], axis=1)
    (E, A), *_ = np.linalg.lstsq(X, losses, rcond=None)
    resid = losses - (E + A * x)
    return float(E), float(A), float(resid @ resid)


def fit_power_law(tokens: Sequence[float], losses: Sequence[float]) -> Optional[PowerLaw]:
    """Least-squares E + A * D^-alpha through (tokens, loss) points; None with fewer than
    ``MIN_POINTS`` finite points or when no alpha gives a falling curve (A > 0)."""
    pts = [(float(d), float(l)) for d, l in zip(tokens, losses)
           if d is not None and l is not None and d > 0 and math.isfinite(l)]
    if len({d for d, _ in pts}) < MIN_POINTS:
        return None
    D = np.array([d for d, _ in pts])
    L = np.array([l for _, l in pts])

    def cost(alpha: float) -> float:
        E, A, sse = _solve(D, L, alpha)
        return sse if A > 0 else math.inf

    grid = np.geomspace(*ALPHA_RANGE, 600)
    costs = np.array([cost(a) for a in grid])
    if not np.isfinite(costs).any():
        return None
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2                      # golden-section search on [lo, hi]
    a, b = lo + (1 - golden) * (hi - lo), lo + golden * (hi - lo)
    ca, cb = cost(a), cost(b)
    for _ in range(80):
        if ca < cb:
            hi, b, cb = b, a, ca
            a = lo + (1 - golden) * (hi - lo)
            ca = cost(a)
        else:
            lo, a, ca = a, b, cb
            b = lo + golden * (hi - lo)
            cb = cost(b)
    alpha = (lo + hi) / 2
    if not cost(alpha) <= costs[i]:
        alpha = float(grid[i])
    E, A, sse = _solve(D, L, alpha)
    if A * D.min() ** -alpha < 1e-6:     # the power-law term vanished: a flat line, not a fit
        return None
    return PowerLaw(E, A, float(alpha), math.sqrt(sse / len(D)))


def _log_interp_root(d0: float, g0: float, d1: float, g1: float) -> float:
    """Where the straight line through (log d0, g0), (log d1, g1) crosses zero."""
    x0, x1 = math.log(d0), math.log(d1)
    return math.exp(x0 + (x1 - x0) * g0 / (g0 - g1))


def fitted_crossing(sparse: PowerLaw, dense: PowerLaw, low: float, high: float,
                    direction: str) -> Optional[float]:
    """First token count in [low, high] where ``sparse - dense`` changes sign in ``direction``
    ("down": from >= 0 to < 0, the sparse model overtaking; "up": the reverse), on a fine log grid
    refined by bisection; None if there is none."""
    grid = np.geomspace(low, high, 2001)
    gap = sparse(grid) - dense(grid)
    for i in range(len(grid) - 1):
        crossed = (gap[i] >= 0 > gap[i + 1]) if direction == "down" else (gap[i] < 0 <= gap[i + 1])
        if crossed:
            a, b = float(grid[i]), float(grid[i + 1])
            for _ in range(60):
                m = math.sqrt(a * b)
                gm = float(sparse(m) - dense(m))
                if (gm >= 0) == (gap[i] >= 0):
                    a = m
                else:
                    b = m
            return math.sqrt(a * b)
    return None


@dataclass(frozen=True)
class Crossover:
    """Where a sparse model overtakes the dense one. ``method``: "measured" (inside the trained
    range), "extrapolated" (from the fits), or "none". ``seed_tokens``: the same estimate from
    each seed's own curves (None where that seed's curves do not cross); ``statement`` says it
    in words with its numbers."""

    tokens: Optional[float]
    method: str
    seed_tokens: list
    statement: str

    def public(self) -> dict:
        return dict(self.__dict__)


def _fmt_tokens(d: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if d >= scale:
            return f"{d / scale:.3g}{unit}"
    return f"{d:.3g}"


def crossover(budgets: Sequence[int], sparse_mean: Sequence[float], dense_mean: Sequence[float],
              sparse_seeds: Sequence[Sequence[float]], dense_seeds: Sequence[Sequence[float]],
              name: str, dense_name: str) -> Crossover:
    """The budget at which ``name`` overtakes ``dense_name``.

    ``*_mean``: mean loss per budget; ``*_seeds``: per budget, one loss per seed (same seed
    order for both models)."""
    gaps = [s - d for s, d in zip(sparse_mean, dense_mean)]
    measured = (f"Measured gaps {name} - {dense_name}: "
                + ", ".join(f"{g:+.4f} at {_fmt_tokens(d)}" for g, d in zip(gaps, budgets)) + " nats. ")
    lost = [i for i in range(len(budgets) - 1) if gaps[i] < 0 <= gaps[i + 1]]
    if lost:
        i = lost[-1]
        back = _log_interp_root(budgets[i], gaps[i], budgets[i + 1], gaps[i + 1])
        measured += (f"{name} was ahead at {_fmt_tokens(budgets[i])} but behind by "
                     f"{_fmt_tokens(budgets[i + 1])} ({dense_name} overtook it at about {_fmt_tokens(back)}). ")
    if len(budgets) == MIN_POINTS:
        measured += (f"With {MIN_POINTS} budgets for 3 parameters each fit passes through every point "
                     f"and has no residual to check it against. ")
    for i in range(len(budgets) - 1):
        if gaps[i] >= 0 > gaps[i + 1]:
            at = _log_interp_root(budgets[i], gaps[i], budgets[i + 1], gaps[i + 1])
            return Crossover(at, "measured", [], (
                f"{name} overtakes {dense_name} inside the trained range, at about "
                f"{_fmt_tokens(at)} tokens: its mean loss gap goes from {gaps[i]:+.4f} nats at "
                f"{_fmt_tokens(budgets[i])} to {gaps[i + 1]:+.4f} at {_fmt_tokens(budgets[i + 1])} "
                f"(linear in log tokens between the two)."))
    lo_b, hi_b = float(min(budgets)), float(max(budgets))
    fs, fd = fit_power_law(budgets, sparse_mean), fit_power_law(budgets, dense_mean)
    if fs is None or fd is None:
        where = "ahead at" if all(g < 0 for g in gaps) else "behind at" if all(g >= 0 for g in gaps) \
            else "on both sides at"
        return Crossover(None, "none", [], measured + (
            f"{name} is {where} every trained budget (gaps "
            f"{', '.join(f'{g:+.4f}' for g in gaps)} nats) and the curves could not be fitted "
            f"(a fit needs {MIN_POINTS} budgets with falling losses), so nothing is extrapolated."))
    if gaps[-1] >= 0:           # behind at the end: look forward
        low, high, span = hi_b, hi_b * EXTRAPOLATE_FACTOR, "beyond"
    else:                       # ahead at the end (and all along): look back for where it began
        low, high, span = lo_b / EXTRAPOLATE_FACTOR, lo_b, "below"
    at = fitted_crossing(fs, fd, low, high, "down")
    seed_at = []
    n_seeds = min(len(sparse_seeds[0]), len(dense_seeds[0])) if sparse_seeds and dense_seeds else 0
    for s in range(n_seeds):
        f1 = fit_power_law(budgets, [row[s] for row in sparse_seeds])
        f2 = fit_power_law(budgets, [row[s] for row in dense_seeds])
        seed_at.append(None if f1 is None or f2 is None else fitted_crossing(f1, f2, low, high, "down"))
    found = [x for x in seed_at if x is not None]
    spread = ""
    if n_seeds >= 2 and at is not None and len(found) * 2 < n_seeds:
        spread = f"; not supported by the seeds: only {len(found)} of {n_seeds} seeds' own fits cross"
    if n_seeds >= 2:
        spread += (f"; per seed: {', '.join('none' if x is None else _fmt_tokens(x) for x in seed_at)}"
                  + (f" (range {_fmt_tokens(min(found))} to {_fmt_tokens(max(found))})" if len(found) >= 2 else ""))
    elif n_seeds == 1:
        spread = "; one seed, so no uncertainty estimate"
    if at is None:
        return Crossover(None, "none", seed_at, measured + (
            f"No crossover predicted: the fitted curves of {name} (alpha {fs.alpha:.3f}) and "
            f"{dense_name} (alpha {fd.alpha:.3f}) do not cross {span} the trained budgets "
            f"(searched to {_fmt_tokens(low if span == 'below' else high)} tokens){spread}."))
    return Crossover(at, "extrapolated", seed_at, measured + (
        f"{name} {'would overtake' if span == 'beyond' else 'overtook'} {dense_name} at about "
        f"{_fmt_tokens(at)} tokens by the fitted curves, extrapolated {span} the trained "
        f"{_fmt_tokens(lo_b)}-{_fmt_tokens(hi_b)}{spread}."))
