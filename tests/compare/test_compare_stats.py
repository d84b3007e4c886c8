"""The verdict rule: Student-t critical values, paired gaps judged against t x SE."""

import math

import pytest

from moelab.compare.stats import judge, mean, sd, t_critical


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                          (10, 2.228), (30, 2.042), (1000, 1.962)])
def test_t_critical_matches_published_quantiles(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=2e-3)


def test_mean_and_sd_skip_missing_values():
    assert mean([1.0, None, 3.0]) == 2.0 and mean([None]) is None
    assert sd([1.0, 3.0]) == pytest.approx(math.sqrt(2)) and sd([2.0]) is None


def test_a_gap_smaller_than_the_seed_spread_is_within_noise():
    v = judge([0.020, -0.012], "seeds")                 # mean +0.004, spread 0.032
    assert v.verdict == "within noise" and v.basis == "seeds" and v.n == 2
    assert v.threshold == pytest.approx(t_critical(1) * sd([0.020, -0.012]) / math.sqrt(2))


def test_consistent_gaps_are_called_in_their_direction():
    assert judge([-0.030, -0.031, -0.029], "seeds").verdict == "ahead"
    assert judge([0.030, 0.031, 0.029], "seeds").verdict == "behind"
    # the same mean with twice the spread of two seeds is no longer enough
    assert judge([-0.02, -0.04], "seeds").verdict == "within noise"


def test_one_sample_gives_no_verdict():
    v = judge([-0.5], "seeds")
    assert v.verdict == "no noise estimate" and v.se is None and v.basis == "none"
