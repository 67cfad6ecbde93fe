"""Paired statistics without scipy: Student t quantiles, the Wilcoxon signed-rank test and a
percentile bootstrap of a mean, for comparing two models on the same images and draws.

    t_quantile(0.975, df=2)                  # 4.3027: the 95 % interval factor for 3 seeds
    t_interval(per_seed_differences)         # (mean, low, high): spread over seeds
    wilcoxon_signed_rank(differences)        # (W+, z, two-sided p): per image, within a seed
    bootstrap_mean_ci(differences, seed=0)   # (low, high): percentile 95 % interval

Student t: the CDF through the regularised incomplete beta function (Lentz's continued
fraction, as in Numerical Recipes' betacf), inverted by bisection to 1e-10. Wilcoxon: zero
differences are dropped (Wilcoxon's rule), ties get average ranks; n <= 25 gives the exact
two-sided p (the distribution of W+ by counting subsets, ties' average ranks doubled to stay
integer), larger n the normal approximation with the tie correction of the variance and a
continuity correction of 0.5.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

EXACT_WILCOXON_UP_TO = 25


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError("incomplete beta: continued fraction did not converge")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on t_cdf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-10 * max(1.0, abs(hi)):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean of `values` (sample SD, n - 1 df); NaN
    bounds for fewer than 2 values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_v = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def _exact_two_sided(w_plus: float, ranks: np.ndarray) -> float:
    """Exact P(|W+ - mean| >= |w - mean|) by counting the 2^n sign patterns (doubled ranks)."""
    doubled = np.rint(2 * ranks).astype(np.int64)
    total = int(doubled.sum())
    counts = np.zeros(total + 1, dtype=np.float64)
    counts[0] = 1.0
    for r in doubled:                        # subset-sum counts of the doubled ranks (>= 2)
        counts[r:] += counts[:-r].copy()
    counts /= counts.sum()
    centre, observed = total / 2.0, abs(2 * w_plus - total / 2.0)
    values = np.arange(total + 1)
    return float(min(1.0, counts[np.abs(values - centre) >= observed - 1e-9].sum()))


def wilcoxon_signed_rank(differences: Sequence[float]) -> tuple[float, float, float]:
    """(W+, z, two-sided p) of the Wilcoxon signed-rank test of paired differences (module
    doc); z is NaN when the exact distribution is used. No non-zero difference: (0, NaN, 1)."""
    d = np.asarray([x for x in differences if np.isfinite(x)], dtype=np.float64)
    d = d[d != 0.0]
    n = d.size
    if n == 0:
        return 0.0, math.nan, 1.0
    ranks = _ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    if n <= EXACT_WILCOXON_UP_TO:
        return w_plus, math.nan, _exact_two_sided(w_plus, ranks)
    mean = n * (n + 1) / 4.0
    _, tie_counts = np.unique(ranks, return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((tie_counts ** 3 - tie_counts).sum()) / 48.0
    z = (abs(w_plus - mean) - 0.5) / math.sqrt(var) * (1 if w_plus >= mean else -1)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return w_plus, z, min(1.0, p)


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 10000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))
