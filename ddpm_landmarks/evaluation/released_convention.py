"""Errors the way the released code of Di Via et al. (WACV 2025) computes them, beside ours,
so that numbers can be set next to their tables. Our convention stays the default; this one is
`ddpm-landmarks evaluate RUN --convention released`, always labelled as such.

    errors, unit = released_errors(pred, gt, sizes, "isbi2015")     # (N, K), in `unit`
    summary = summarize(errors, RELEASED_RADII)                      # evaluation/metrics.py

downstream_task/metrics.py (compute_batch_metrics) and utilities.py, per image of original size
W x H, with points in original pixels:
1. Everything is on the 256 x 256 network grid. A point (x, y) goes there as the released
   dataset puts its labels: u = round(x / W * 256), v = round(y / H * 256) (Python's round:
   halves to even), integers.
2. The ground truth is re-extracted from the target disc drawn at that grid point (a Gaussian
   of sigma 5 thresholded at half its maximum over the grid): the centroid of the disc's largest
   external contour (cv2), rounded. It is the grid point itself unless the disc is cut by the
   border of the grid.
3. Our prediction (original pixels) is put on the grid in the same way (step 1). A landmark we
   report missing is (0, 0), the released extract_landmarks' zeros, and is scored like any
   other point (the released code never abstains).
4. Distance sqrt((du * fx)^2 + (dv * fy)^2), with the released factors:
     isbi2015      (fx, fy) = (2400 / 256, 1935 / 256) x 0.1 mm: x and y SWAPPED (the images are
                   1935 wide and 2400 high, so x errors count 24 % too much, y errors 19 % too
                   little);
     hand_dha      fx = fy = 50 / |g0 - g4| mm, g the image's rounded grid ground truth: the
                   distance between landmarks 0 and 4 is 50 mm (our default wrist pair is
                   Payer's (1, 5): data.wrist_landmarks; the released code uses (0, 4));
     chest_gu2net  1: pixels of the 256 x 256 grid.
5. MRE = the mean over every image-landmark pair; SDR(r) = the share with distance <= r, for
   r = 2, 2.5, 3, 4, 6, 9, 10 on every dataset (mm, or grid pixels for the chest).
A ground-truth point our data marks missing (none in the released sets) is left out (NaN).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

GRID = 256
SIGMA = 5.0
RELEASED_RADII = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)
ISBI_FACTOR = (2400 / GRID * 0.1, 1935 / GRID * 0.1)
HAND_PAIR = (0, 4)
HAND_WIDTH_MM = 50.0
UNITS = {"isbi2015": "mm (released convention: 256 grid, x/y spacing swapped)",
         "hand_dha": "mm (released convention: 256 grid, landmarks 0-4 = 50 mm)",
         "chest_gu2net": "px@256x256 (released convention)"}


def to_released_grid(points: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """(K, 2) original pixels (NaN = missing) -> integer points on the 256 grid: round(x / W *
    256), half to even (np.rint, as Python's round); missing -> (0, 0)."""
    p = np.asarray(points, dtype=np.float64) / np.asarray(size, dtype=np.float64) * GRID
    p = np.rint(p)
    p[~np.isfinite(p).all(axis=1)] = 0.0
    return p


def disc(point: Sequence[float]) -> np.ndarray:
    """The released binary target at an integer grid point: exp(-d^2 / (2 sigma^2)) >= half of
    its maximum over the 256 x 256 grid (utilities.generate_heatmap_from_points)."""
    x, y = np.meshgrid(np.arange(GRID), np.arange(GRID))
    heat = np.exp(-((x - point[0]) ** 2 + (y - point[1]) ** 2) / (2 * SIGMA ** 2))
    return (heat >= 0.5 * heat.max()).astype(np.uint8)


def extract_point(binary: np.ndarray) -> np.ndarray:
    """utilities.extract_landmarks on one binary map: centroid of the largest external contour
    (polygon moments), (0, 0) without one or when its area is zero; then rounded on the grid."""
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros(2)
    moments = cv2.moments(max(contours, key=cv2.contourArea))
    if moments["m00"] == 0:
        return np.zeros(2)
    return np.rint(np.array([moments["m10"], moments["m01"]]) / moments["m00"])


def released_truth(points: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """The ground truth as scored: each grid point re-extracted from its disc (step 2);
    NaN where our ground truth is missing."""
    grid = to_released_grid(points, size)
    out = np.array([extract_point(disc(g)) for g in grid])
    out[~np.isfinite(np.asarray(points, dtype=np.float64)).all(axis=1)] = np.nan
    return out


def released_factor(dataset: str, truth_grid: np.ndarray) -> tuple[float, float]:
    """(fx, fy) of step 4 for one image."""
    if dataset == "isbi2015":
        return ISBI_FACTOR
    if dataset == "hand_dha":
        a, b = truth_grid[HAND_PAIR[0]], truth_grid[HAND_PAIR[1]]
        width = float(np.hypot(*(a - b)))
        s = HAND_WIDTH_MM / width if width > 0 else np.nan
        return s, s
    if dataset == "chest_gu2net":
        return 1.0, 1.0
    raise ValueError(f"the released convention is defined for isbi2015, hand_dha and "
                     f"chest_gu2net (the released code's three datasets), not {dataset!r}")


def released_errors(predictions: np.ndarray, truths: np.ndarray,
                    sizes: Sequence[Sequence[float]], dataset: str) -> tuple[np.ndarray, str]:
    """((N, K) distances in the released convention, their unit) for predictions and ground
    truth (N, K, 2) in original pixels and each image's original (W, H)."""
    rows = []
    for pred, gt, size in zip(np.asarray(predictions), np.asarray(truths), sizes):
        truth = released_truth(gt, size)
        fx, fy = released_factor(dataset, truth)
        d = (to_released_grid(pred, size) - truth) * np.array([fx, fy])
        rows.append(np.hypot(d[:, 0], d[:, 1]))
    return np.array(rows), UNITS[dataset]
