"""Split conformal regions: the quantile rule by hand, and the coverage guarantee on
synthetic errors whose distribution is known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm_landmarks.evaluation.conformal import (
    conformal_quantile,
    conformal_rank,
    conformity_scores,
    coverage,
    covered,
    fit_quantiles,
    min_calibration_size,
    region_radii,
)


def test_rank_and_quantile_by_hand():
    # n = 9 scores 1..9: alpha 0.1 -> ceil(10 x 0.9) = 9th smallest = 9; alpha 0.2 -> 8th.
    scores = np.arange(9, 0, -1, dtype=float)
    assert conformal_rank(9, 0.1) == 9 and conformal_quantile(scores, 0.1) == 9.0
    assert conformal_rank(9, 0.2) == 8 and conformal_quantile(scores, 0.2) == 8.0
    # alpha 0.05 needs rank ceil(10 x 0.95) = 10 > 9: only an infinite radius is valid.
    assert conformal_rank(9, 0.05) == 10 and conformal_quantile(scores, 0.05) == math.inf
    # 1 - alpha is inexact in binary: 10 x (1 - 0.7) = 3.0000000000000004 must give rank 3.
    assert conformal_rank(9, 0.7) == 3
    assert min_calibration_size(0.1) == 9 and min_calibration_size(0.05) == 19
    assert conformal_quantile([], 0.1) == math.inf
    assert conformal_quantile([np.nan, 1.0, 2.0], 0.5) == 2.0      # NaN = no ground truth
    with pytest.raises(ValueError, match="alpha"):
        conformal_rank(10, 1.0)


def test_conformity_conventions():
    errors = np.array([[2.0, np.inf, np.nan, 3.0]])
    scales = np.array([[4.0, 1.0, 1.0, np.nan]])
    s = conformity_scores(errors, scales)
    # 2 / 4; a miss -> inf; no ground truth -> NaN; unknown scale -> inf (conservative)
    np.testing.assert_array_equal(s, [[0.5, np.inf, np.nan, np.inf]])
    r = region_radii(np.array([2.0, 2.0, math.inf]), np.array([[1.5, np.nan, 1.0]]))
    np.testing.assert_array_equal(r, [[3.0, np.inf, np.inf]])
    # covered: a miss only by an infinite radius; no ground truth never
    hit = covered(np.array([[3.0, np.inf, np.inf, np.nan]]),
                  np.array([[3.0, 10.0, np.inf, np.inf]]))
    np.testing.assert_array_equal(hit, [[True, False, True, False]])


def draw(rng, n, k=1):
    """Errors with a known law: e = sigma |N(0, I_2)| (Rayleigh of scale sigma), sigma
    log-uniform in [0.5, 4] mm per point; the score is sigma itself."""
    sigma = np.exp(rng.uniform(np.log(0.5), np.log(4.0), size=(n, k)))
    return sigma * np.sqrt(rng.chisquare(2, size=(n, k))), sigma


@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("n,alpha", [(10, 0.1), (25, 0.05), (30, 0.1)])
def test_finite_sample_coverage_on_known_errors(n, alpha, normalised):
    """For exchangeable continuous scores the coverage, averaged over calibration sets, is
    exactly rank / (n + 1) with rank = ceil((n + 1)(1 - alpha)), in [1 - alpha, 1 - alpha +
    1 / (n + 1)]. Each of the 4000 "landmarks" (columns) is an independent trial with its own
    calibration set and 50 test points. (The n are chosen so that the textbook slip
    ceil(n (1 - alpha)) gives another rank: 9 / 11, 24 / 26, 27 / 31 would fail.)"""
    rng = np.random.default_rng(0)
    trials, per_trial = 4000, 50
    e_cal, s_cal = draw(rng, n, trials)
    e_test, s_test = draw(rng, per_trial, trials)
    u_cal, u_test = (s_cal, s_test) if normalised else (1.0, np.ones_like(s_test))
    q, counts = fit_quantiles(e_cal, u_cal, [alpha])
    assert (counts == n).all()
    rate = covered(e_test, region_radii(q[alpha], u_test)).mean()
    exact = conformal_rank(n, alpha) / (n + 1)
    assert 1 - alpha <= exact <= 1 - alpha + 1 / (n + 1)
    # Per trial: the coverage given q is Beta(rank, n + 1 - rank), plus binomial test noise.
    se = math.sqrt(exact * (1 - exact) * (1 / (n + 2) + 1 / per_trial) / trials)
    assert abs(rate - exact) < 4 * se, (rate, exact, se)


def test_large_calibration_matches_the_known_quantile_and_adapts():
    """With n = 40000 the normalised q is the Rayleigh quantile sqrt(2 ln(1 / alpha)), and the
    radius follows each point's sigma: coverage is right for easy and hard points alike,
    while one radius for all over-covers the easy and under-covers the hard ones."""
    rng = np.random.default_rng(1)
    e_cal, s_cal = draw(rng, 40000)
    q, _ = fit_quantiles(e_cal, s_cal, [0.1])
    assert q[0.1][0] == pytest.approx(math.sqrt(2 * math.log(10)), rel=0.01)
    e, s = draw(rng, 40000)
    plain, _ = fit_quantiles(e_cal, 1.0, [0.1])
    hard = s > 2.0
    for radii, lo_hard, hi_easy in [(region_radii(q[0.1], s), 0.88, 0.92),
                                    (region_radii(plain[0.1], np.ones_like(s)), 0.0, 1.0)]:
        hit = covered(e, radii)
        assert hit.mean() == pytest.approx(0.9, abs=0.01)
        if lo_hard:
            assert lo_hard < hit[hard].mean() < 0.92 and 0.88 < hit[~hard].mean() < hi_easy
        else:
            assert hit[hard].mean() < 0.8 and hit[~hard].mean() > 0.97
    # Efficiency: the adaptive radii are smaller on average at the same coverage.
    assert region_radii(q[0.1], s).mean() < plain[0.1][0]


def test_coverage_per_landmark():
    errors = np.array([[1.0, 5.0], [2.0, np.nan], [3.0, np.inf]])
    radii = np.full((3, 2), 2.5)
    c = coverage(errors, radii)
    assert c["per_landmark"] == [2 / 3, 0.0] and c["overall"] == pytest.approx(2 / 5)
    assert c["n"] == 5
