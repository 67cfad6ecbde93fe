"""Paired statistics against published values: Student t quantiles (tables), the Wilcoxon
signed-rank test on Darwin's Zea mays differences (scipy's documented exact p), the normal
approximation by hand, and the bootstrap interval's basic properties."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm_landmarks.studies.paired_stats import (
    bootstrap_mean_ci,
    incomplete_beta,
    t_cdf,
    t_interval,
    t_quantile,
    wilcoxon_signed_rank,
)


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (2, 4.302653), (4, 2.776445),
                                          (10, 2.228139), (30, 2.042272)])
def test_t_quantiles_match_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-5)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-5)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-6)   # tables: 6 decimals


def test_incomplete_beta_closed_forms():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)          # uniform
    assert incomplete_beta(2.0, 1.0, 0.3) == pytest.approx(0.09)         # x^2
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi.
    assert t_cdf(2.5, 1) == pytest.approx(0.5 + math.atan(2.5) / math.pi, abs=1e-12)


def test_t_interval_of_three_seeds():
    mean, low, high = t_interval([0.1, 0.3, 0.2])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half), abs=1e-6)
    assert math.isnan(t_interval([0.5])[1])


def test_wilcoxon_darwin_exact():
    # Darwin's cross- minus self-fertilised Zea mays heights (eighths of an inch), the
    # example of scipy.stats.wilcoxon: statistic min(W+, W-) = 24, exact p = 0.041259765625.
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    w_plus, z, p = wilcoxon_signed_rank(d)
    assert min(w_plus, 120 - w_plus) == 24
    assert math.isnan(z) and p == pytest.approx(0.041259765625, abs=1e-12)
    # Zeros are dropped; the sign of every difference flipped gives the same p.
    assert wilcoxon_signed_rank(d + [0, 0])[2] == pytest.approx(p)
    assert wilcoxon_signed_rank([-x for x in d])[2] == pytest.approx(p)


def test_wilcoxon_normal_approximation_by_hand():
    w_plus, z, p = wilcoxon_signed_rank(list(range(1, 31)))            # 30 positive, no ties
    var = 30 * 31 * 61 / 24
    assert w_plus == 465
    assert z == pytest.approx((465 - 232.5 - 0.5) / math.sqrt(var))
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert wilcoxon_signed_rank([])[2] == 1.0


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=200)
    low, high = bootstrap_mean_ci(values, seed=3)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)
    assert bootstrap_mean_ci(values, seed=3) == (low, high)            # seeded
