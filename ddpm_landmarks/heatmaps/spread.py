"""How spread out a heatmap's peak is: a 2 x 2 covariance per channel, on the heatmap grid.

    cov = spread_covariance(heatmaps, "moments", window=5)   # (..., 2, 2) in grid px^2

A sharp peak says the network is sure of the position; a wide or flat one says it is not. The
covariance is on the heatmap's own grid (x, y order, pixel-centre convention); the uncertainty
code maps it to original pixels and millimetres with the same matrix as the point
(inference/uncertainty.py).

Methods (heatmaps (K, H, W) or any leading shape, numpy or torch):
- moments:      second central moments of the positive part of the heatmap in the
                (2w+1)^2 window around the argmax (clipped at the image edge), used as weights
                of a distribution (the "local softmax" of a probability heatmap). For a Gaussian
                of covariance S sampled on the grid (sigma >= 1) and a window of >= 5 sigma the
                result is S to < 1e-6 relative; the default window of 3 sigma cuts the tails
                (-0.4 % at sigma 1.5). Full covariance: an elongated blob gives its orientation.
- gaussian_fit: the Gaussian whose log is the separable parabola through the peak and its
                two neighbours per axis (what the parabola decoder fits): var = -1 / (second
                difference of log values). Exact for an axis-aligned Gaussian; diagonal only;
                NaN at the image edge or on a plateau.

A channel without location information (all NaN or constant), or with no positive weight,
has a NaN covariance: unknown spread, which the conformal code treats as "no guarantee".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ddpm_landmarks.config.common import HeatmapConfig

# Values are clipped to this fraction of the peak before the log (as the parabola decoder).
LOG_FLOOR = 1e-12


def _as_channels(heatmaps) -> tuple[np.ndarray, tuple[int, ...]]:
    if hasattr(heatmaps, "detach"):                     # torch tensor, on any device
        heatmaps = heatmaps.detach().float().cpu().numpy()
    h = np.asarray(heatmaps, dtype=np.float64)
    if h.ndim < 2:
        raise ValueError(f"heatmaps must be (..., H, W), got shape {h.shape}")
    return h.reshape(-1, *h.shape[-2:]), h.shape[:-2]


def _argmax(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(iy, ix, informative) per channel of (M, H, W); NaN ignored, constant = uninformative."""
    m, h, w = flat.shape
    finite = np.isfinite(flat).reshape(m, -1)
    high = np.where(finite, flat.reshape(m, -1), -np.inf)
    low = np.where(finite, flat.reshape(m, -1), np.inf)
    idx = np.argmax(high, axis=1)
    peak = high[np.arange(m), idx]
    iy, ix = np.divmod(idx, w)
    return iy, ix, np.isfinite(peak) & (peak > low.min(axis=1))


def window_moments(heatmaps, window: int = 5) -> np.ndarray:
    """(..., 2, 2) covariance of the positive heatmap mass in the window around the argmax."""
    flat, lead = _as_channels(heatmaps)
    m, h, w = flat.shape
    iy, ix, ok = _argmax(flat)
    off = np.arange(-int(window), int(window) + 1)
    ys, xs = iy[:, None] + off, ix[:, None] + off                    # (M, 2w+1)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    values = flat[np.arange(m)[:, None, None], np.clip(ys, 0, h - 1)[:, :, None],
                  np.clip(xs, 0, w - 1)[:, None, :]]
    weights = np.where(inside & np.isfinite(values), np.maximum(values, 0.0), 0.0)
    total = weights.sum(axis=(1, 2))
    gy = np.broadcast_to(ys[:, :, None], weights.shape).astype(np.float64)
    gx = np.broadcast_to(xs[:, None, :], weights.shape).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = weights / total[:, None, None]
        mx, my = (p * gx).sum(axis=(1, 2)), (p * gy).sum(axis=(1, 2))
        dx, dy = gx - mx[:, None, None], gy - my[:, None, None]
        cxx, cyy, cxy = ((p * dx * dx).sum(axis=(1, 2)), (p * dy * dy).sum(axis=(1, 2)),
                         (p * dx * dy).sum(axis=(1, 2)))
    cov = np.stack([np.stack([cxx, cxy], -1), np.stack([cxy, cyy], -1)], -2)
    cov[~(ok & (total > 0))] = np.nan
    return cov.reshape(*lead, 2, 2)


def gaussian_fit(heatmaps, window: int = 0) -> np.ndarray:
    """(..., 2, 2) diagonal covariance of the Gaussian through the peak's log-parabola fit
    (`window` is unused: the fit reads the peak's 4-neighbourhood)."""
    flat, lead = _as_channels(heatmaps)
    m, h, w = flat.shape
    iy, ix, ok = _argmax(flat)
    n = np.arange(m)
    peak = flat[n, iy, ix]
    ok = ok & (peak > 0)
    floor = np.where(ok, peak, 1.0) * LOG_FLOOR

    def logv(yy, xx):
        v = flat[n, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return np.log(np.maximum(np.where(np.isfinite(v), v, -np.inf), floor))

    def variance(lo, hi, has_both):
        curvature = lo - 2.0 * logv(iy, ix) + hi           # <= 0 at the maximum
        with np.errstate(divide="ignore"):
            var = -1.0 / curvature
        return np.where(has_both & (curvature < 0), var, np.nan)

    vx = variance(logv(iy, ix - 1), logv(iy, ix + 1), (ix > 0) & (ix < w - 1))
    vy = variance(logv(iy - 1, ix), logv(iy + 1, ix), (iy > 0) & (iy < h - 1))
    zero = np.zeros(m)
    cov = np.stack([np.stack([vx, zero], -1), np.stack([zero, vy], -1)], -2)
    cov[~ok] = np.nan
    return cov.reshape(*lead, 2, 2)


SPREADS: dict[str, Callable[..., np.ndarray]] = {
    "moments": window_moments,
    "gaussian_fit": gaussian_fit,
}


def auto_window(heatmap_cfg: HeatmapConfig) -> int:
    """Window half-width that holds a training target: 3 sigma (Gaussian), radius + 1 (disc)."""
    if heatmap_cfg.kind == "disc":
        return max(2, int(np.ceil(heatmap_cfg.disc_radius)) + 1)
    return max(2, int(np.ceil(3.0 * heatmap_cfg.sigma)))


def spread_covariance(heatmaps, method: str = "moments", window: int = 5) -> np.ndarray:
    """Covariance (..., 2, 2) of each channel's peak with the named method (see module doc)."""
    if method not in SPREADS:
        raise ValueError(f"unknown spread method {method!r}; available: {', '.join(SPREADS)}")
    return SPREADS[method](heatmaps, window)
