"""Training targets: one heatmap channel per landmark, on the model grid.

Conventions (see data/sample.py): points are (x, y) float in the pixel-centre convention, NaN
= missing; `size` here is (H, W) = the array shape, NOT (width, height) like `original_size`.

- Gaussian target: exp(-d^2 / (2 sigma^2)) evaluated at pixel centres, centred on the FLOAT
  position (no rounding to the grid, unlike the original code), unnormalised so the continuous
  peak is 1. It is separable, so a (K, H, W) stack is an outer product of a (K, H) and a (K, W)
  factor: exact everywhere (no truncation) and vectorised.
- Disc target: 1 where the distance to the point is <= radius, else 0. This is the original
  code's thresholded target (a Gaussian thresholded at half its maximum is a disc of radius
  sigma * sqrt(2 ln 2) ~= 1.18 sigma), kept for comparison.

A missing landmark (NaN), or one so far outside the grid that its target would carry nothing,
gets an all-zero channel and mask False: the loss must ignore that channel rather than teach
the model "no landmark here".
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import HeatmapConfig

# Beyond this many sigmas outside the grid a Gaussian target is < exp(-4.5) ~ 1% everywhere on
# it: the point is treated as absent (mask False, zero channel).
GAUSSIAN_MASK_SIGMAS = 3.0


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be a K x 2 array of (x, y), got shape {points.shape}")
    return points


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"size must be (H, W) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def landmark_mask(points: np.ndarray, size: Optional[Sequence[int]] = None,
                  margin: float = 0.0) -> np.ndarray:
    """(K,) bool: False for a missing point (NaN) and, when `size` = (H, W) is given, for a
    point farther than `margin` pixels outside the grid's extent [-0.5, W-0.5] x [-0.5, H-0.5].
    """
    points = _check_points(points)
    mask = np.isfinite(points).all(axis=1)
    if size is not None:
        h, w = _check_size(size)
        with np.errstate(invalid="ignore"):   # NaN comparisons are False: already masked out
            x, y = points[:, 0], points[:, 1]
            mask &= (x >= -0.5 - margin) & (x <= w - 0.5 + margin)
            mask &= (y >= -0.5 - margin) & (y <= h - 0.5 + margin)
    return mask


def gaussian_heatmaps(points: np.ndarray, size: Sequence[int], sigma: float) -> np.ndarray:
    """(K, H, W) float32: exp(-((x - px)^2 + (y - py)^2) / (2 sigma^2)) at pixel centres.

    Missing (NaN) points give all-zero channels. Points outside the grid are NOT masked here
    (their tails are drawn as they are); use `make_targets` for targets plus a mask.
    """
    points = _check_points(points)
    h, w = _check_size(size)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    valid = np.isfinite(points).all(axis=1)
    p = np.where(valid[:, None], points, 0.0)
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    # Separable: exp(-(dx^2 + dy^2)/2s^2) = exp(-dx^2/2s^2) * exp(-dy^2/2s^2).
    gx = np.exp(-((xs[None, :] - p[:, 0:1]) ** 2) / (2.0 * sigma ** 2))   # (K, W)
    gy = np.exp(-((ys[None, :] - p[:, 1:2]) ** 2) / (2.0 * sigma ** 2))   # (K, H)
    gx[~valid] = 0.0
    return (gy[:, :, None] * gx[:, None, :]).astype(np.float32)


def disc_heatmaps(points: np.ndarray, size: Sequence[int], radius: float) -> np.ndarray:
    """(K, H, W) float32: 1 at pixel centres within `radius` (<=) of the point, else 0."""
    points = _check_points(points)
    h, w = _check_size(size)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    valid = np.isfinite(points).all(axis=1)
    p = np.where(valid[:, None], points, 0.0)
    dx2 = (np.arange(w, dtype=np.float64)[None, :] - p[:, 0:1]) ** 2      # (K, W)
    dy2 = (np.arange(h, dtype=np.float64)[None, :] - p[:, 1:2]) ** 2      # (K, H)
    inside = (dy2[:, :, None] + dx2[:, None, :]) <= radius ** 2
    inside[~valid] = False
    return inside.astype(np.float32)


def make_targets(points: np.ndarray, size: Sequence[int],
                 cfg: HeatmapConfig) -> tuple[np.ndarray, np.ndarray]:
    """Targets for one image: ((K, H, W) float32 heatmaps, (K,) bool mask) per `cfg.kind`.

    The mask is False for missing points and for points whose target would be (nearly) empty
    on the grid: more than 3 sigma (Gaussian) or more than the radius (disc) outside it. Masked
    channels are all zero.
    """
    points = _check_points(points)
    if cfg.kind == "gaussian":
        maps = gaussian_heatmaps(points, size, cfg.sigma)
        margin = GAUSSIAN_MASK_SIGMAS * cfg.sigma
    elif cfg.kind == "disc":
        maps = disc_heatmaps(points, size, cfg.disc_radius)
        margin = cfg.disc_radius
    else:
        raise ValueError(f"unknown heatmap kind {cfg.kind!r}; expected 'gaussian' or 'disc'")
    mask = landmark_mask(points, size, margin=margin)
    maps[~mask] = 0.0
    return maps, mask
