"""Split conformal prediction regions per landmark: a radius around each predicted point that
holds the true point with probability >= 1 - alpha.

    q = fit_quantiles(cal_errors, cal_scales, alphas=[0.1, 0.05])   # {alpha: (K,)}
    radii = region_radii(q[0.1], test_scales)                        # (N, K), error unit
    coverage(test_errors, radii)                                     # per landmark, overall

Method (split conformal with normalised conformity scores; Vovk et al. 2005, Papadopoulos et
al. 2008, Lei et al. 2018; for landmarks, Jonkers et al. 2025). For landmark k, each of the
n_k calibration images i with a ground-truth point gives a conformity score

    s_ik = e_ik / u_ik        e = radial error (mm, or pixels), u = the image's uncertainty
                              scale for that landmark (1 for the plain method)

and q_k(alpha) = the ceil((n_k + 1)(1 - alpha))-th smallest of them. A test image's region is
the disc of radius r = q_k(alpha) * u around its prediction (in mm; an axis-aligned ellipse in
pixels where the spacing is anisotropic).

Guarantee: if the calibration images and the test image are exchangeable (drawn from the same
distribution - the same pool, scanner, population and annotators - and the model and the
score function were fixed without looking at them), then for every landmark

    P(e_test <= r_test) >= 1 - alpha,

marginally over calibration set and test image (finite-sample, no assumption on the model or
the error distribution), and <= 1 - alpha + 1 / (n_k + 1) when the scores have no ties. It is
not conditional on the image: a hard image can be under-covered while easy ones are
over-covered; normalising by u makes the radius follow the image's own difficulty, which helps
only as much as u ranks the errors. Calibration images from another site or another split
than the test images (e.g. Test2 of ISBI, acquired later) break exchangeability, and the
guarantee with it.

When n_k is too small for alpha (ceil((n_k + 1)(1 - alpha)) > n_k, e.g. n < 19 for alpha
0.05) the only valid radius is infinite: q is +inf and it is reported so, never clipped.

Conventions: a missed prediction (error +inf) has conformity +inf, never covered by a finite
radius (an infinite radius covers everything, inf <= inf); a pair without ground truth (error
NaN) is not used; an unknown scale (NaN, e.g. a flat heatmap) has conformity +inf in
calibration and an infinite radius at test time.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def conformal_rank(n: int, alpha: float) -> int:
    """ceil((n + 1)(1 - alpha)): the 1-based rank of the calibration score used as q."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # Rounded first: 1 - alpha is inexact in binary (10 * (1 - 0.7) = 3.0000000000000004).
    return int(math.ceil(round((n + 1) * (1.0 - alpha), 9)))


def conformity_scores(errors: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """errors / scales with the module's conventions (NaN where there is no ground truth)."""
    errors = np.asarray(errors, dtype=np.float64)
    scales = np.broadcast_to(np.asarray(scales, dtype=np.float64), errors.shape)
    usable = np.isfinite(errors) & np.isfinite(scales) & (scales > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(usable, errors / np.where(usable, scales, 1.0), np.inf)
    return np.where(np.isnan(errors), np.nan, s)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest of the non-NaN `scores`; +inf when that rank
    exceeds n (n too small for alpha, or no scores at all)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    s = s[~np.isnan(s)]
    rank = conformal_rank(s.size, alpha)
    return float(s[rank - 1]) if rank <= s.size else math.inf


def min_calibration_size(alpha: float) -> int:
    """Smallest n with a finite q: ceil((n + 1)(1 - alpha)) <= n, i.e. n >= 1/alpha - 1."""
    n = 1
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def fit_quantiles(errors: np.ndarray, scales: np.ndarray,
                  alphas: Sequence[float]) -> tuple[dict[float, np.ndarray], np.ndarray]:
    """Per-landmark q_k(alpha) from calibration errors (N, K) and scales (N, K) (or a
    broadcastable array: 1 for the plain method). Returns ({alpha: (K,)}, n_k (K,))."""
    s = conformity_scores(errors, scales)
    if s.ndim != 2:
        raise ValueError(f"errors must be (N, K), got shape {s.shape}")
    counts = (~np.isnan(s)).sum(axis=0)
    quantiles = {float(a): np.array([conformal_quantile(s[:, k], a) for k in range(s.shape[1])])
                 for a in alphas}
    return quantiles, counts


def region_radii(quantiles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Radius q_k * u_ik (N, K): +inf where q is infinite or the scale unknown."""
    q = np.asarray(quantiles, dtype=np.float64)
    u = np.asarray(scales, dtype=np.float64)
    known = np.isfinite(u) & (u > 0)
    with np.errstate(invalid="ignore"):
        r = np.where(known, q * np.where(known, u, 1.0), np.inf)
    return np.where(np.isfinite(q), r, np.inf)


def covered(errors: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean (N, K): error <= radius (a miss is covered by an infinite radius only); pairs
    without ground truth are False - select them out with np.isfinite / ~np.isnan(errors)."""
    errors = np.asarray(errors, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(errors) & (errors <= np.asarray(radii, dtype=np.float64))


def coverage(errors: np.ndarray, radii: np.ndarray) -> dict:
    """Empirical coverage: {"overall": fraction, "per_landmark": [fraction (K)], "n": pairs}
    over the pairs with ground truth (NaN where a landmark has none)."""
    errors = np.asarray(errors, dtype=np.float64)
    has = ~np.isnan(errors)
    hit = covered(errors, radii)
    per = [float(hit[:, k].sum() / has[:, k].sum()) if has[:, k].any() else math.nan
           for k in range(errors.shape[1])]
    total = int(has.sum())
    return {"overall": float(hit.sum() / total) if total else math.nan,
            "per_landmark": per, "n": total}
