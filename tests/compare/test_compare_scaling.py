"""Fitting loss(D) = E + A * D^-alpha and finding where a sparse model overtakes the dense one."""

import numpy as np
import pytest

from moelab.compare.scaling import crossover, fit_power_law

D = np.array([1e5, 2e5, 5e5, 1e6, 2e6, 5e6])


@pytest.mark.parametrize("E, A, alpha", [(1.8, 400.0, 0.35), (3.2, 25.0, 0.12), (0.9, 3e4, 0.8)])
def test_fit_recovers_known_parameters(E, A, alpha):
    fit = fit_power_law(D, E + A * D ** -alpha)
    assert fit.E == pytest.approx(E, rel=1e-4)
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.alpha == pytest.approx(alpha, rel=1e-4)
    assert fit.rmse < 1e-8


def test_fit_with_noise_and_the_minimum_of_three_budgets():
    rng = np.random.default_rng(0)
    noisy = 1.8 + 400 * D ** -0.35 + rng.normal(0, 0.002, len(D))
    fit = fit_power_law(D, noisy)
    assert fit.alpha == pytest.approx(0.35, abs=0.03) and fit.E == pytest.approx(1.8, abs=0.05)
    three = fit_power_law(D[:3], 1.8 + 400 * D[:3] ** -0.35)
    assert three.alpha == pytest.approx(0.35, rel=1e-3)
    assert fit_power_law(D[:2], [3.0, 2.9]) is None               # two points cannot fix three numbers
    assert fit_power_law(D[:3], [2.0, 2.1, 2.2]) is None          # rising loss: no A > 0


def _seeds(mean, offsets):
    return [[m + o for o in offsets] for m in mean]


def test_crossover_measured_inside_the_range():
    b = [1e5, 3e5, 1e6]
    dense = 2.0 + 20 * np.array(b) ** -0.3
    sparse = 1.95 + 22 * np.array(b) ** -0.3                      # behind, then ahead
    c = crossover(b, list(sparse), list(dense), _seeds(sparse, [0, 0]), _seeds(dense, [0, 0]), "moe", "dense")
    gaps = sparse - dense
    assert gaps[0] > 0 > gaps[1]
    assert c.method == "measured" and 1e5 < c.tokens < 3e5
    assert "+" in c.statement and "moe overtakes dense" in c.statement


def test_crossover_extrapolated_with_a_seed_spread():
    b = [2.5e4, 5e4, 1e5]
    dense = 2.0 + 20 * np.array(b) ** -0.3
    sparse = 1.95 + 22 * np.array(b) ** -0.3                      # behind everywhere, closing
    true = (2 / 0.05) ** (1 / 0.3)                                # where 2 * D^-0.3 = 0.05
    c = crossover(b, list(sparse), list(dense), _seeds(sparse, [0.0, 0.002]),
                  _seeds(dense, [0.0, 0.0]), "moe", "dense")
    assert c.method == "extrapolated" and c.tokens == pytest.approx(true, rel=1e-3)
    assert len(c.seed_tokens) == 2 and c.seed_tokens[0] == pytest.approx(true, rel=1e-3)
    assert c.seed_tokens[1] > c.seed_tokens[0]                    # a worse seed crosses later
    assert "range" in c.statement


def test_no_crossover_predicted_when_the_curves_diverge():
    b = [1e5, 3e5, 1e6]
    dense = 2.0 + 20 * np.array(b) ** -0.3
    sparse = 2.1 + 20 * np.array(b) ** -0.3                       # a constant 0.1 behind
    c = crossover(b, list(sparse), list(dense), _seeds(sparse, [0]), _seeds(dense, [0]), "moe", "dense")
    assert c.tokens is None and c.method == "none" and "No crossover predicted" in c.statement
