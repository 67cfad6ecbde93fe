"""Heatmaps -> landmark coordinates.

Every decoder takes heatmaps shaped (K, H, W) or batched (B, K, H, W) (any leading shape, numpy
or torch) and returns (points (..., 2) float64 (x, y) on the heatmap grid in the pixel-centre
convention, confidence (...) float64 = the channel's peak value).

A channel with no usable peak - all NaN, constant (e.g. all zero), peak < cfg.min_peak, or no
contour for `contour` - is MISSING: coordinates NaN and confidence 0. Never (0, 0): the original
code left such landmarks at the image corner, which silently poisons MRE.

min_peak = NEVER_ABSTAIN (-inf; `never_abstain(cfg)`) turns abstaining off: every channel with a
finite, non-constant maximum gets a position, whatever the sign of its peak (validation and the
pretraining probe decode so: a model cannot improve its MRE by abstaining on hard landmarks).
Only channels without location information (all NaN or constant) stay missing.

Decoders:
- argmax:      the integer pixel of the maximum (error up to 0.5 px per axis by construction).
- parabola:    argmax + a 1-D parabola through the peak and its two neighbours, separately in x
               and y, fitted on the LOG of the values (clipped below at 1e-12 x peak). A Gaussian
               is exp(quadratic), so its log is exactly a separable quadratic and the fit recovers
               the float centre exactly; a parabola on raw values is biased by up to ~0.1 px.
               At the image edge (no neighbour on one side) that axis stays at the integer.
- soft_argmax: weighted centroid in the (2w+1)^2 window around the argmax (clipped at the image
               edge), weights = value minus the HIGHEST value on the window's border, floored
               at 0. Subtracting the border maximum (rather than the window minimum) makes the
               weights vanish before the window edge, so the off-centre window does not pull the
               centroid towards its own centre (bias < 0.02 px at sigma 3, w 5, versus ~0.1 px
               with the minimum). Within ~1.5 px of the image edge it degrades (half the blob
               is cut off); parabola does not.
- contour:     the released code's `extract_landmarks` (downstream_task/utilities.py): binarise
               at value >= contour_threshold x peak (0.5 x the channel's maximum there),
               cv2.findContours (external), take the contour of largest area, return its
               polygon-moment centroid. The polygon joins boundary pixel centres, so the result
               is quantised (errors up to ~0.3 px on a Gaussian at a random float position);
               kept for comparison. A degenerate largest contour (a single pixel or a 1-px line,
               zero area) falls back to the mean of its points instead of being dropped. A peak
               <= 0 gives no blob under this rule (the released code then returns (0, 0)): the
               channel is missing, or, with NEVER_ABSTAIN, at its argmax pixel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import cv2
import numpy as np

from ddpm_landmarks.config.common import DecoderConfig

Decoder = Callable[..., tuple[np.ndarray, np.ndarray]]

# Parabola on logs: values are clipped to this fraction of the peak before the log, so a zero
# (or negative) neighbour gives a large but finite curvature instead of -inf.
LOG_FLOOR = 1e-12

# min_peak that never reports a channel missing for its peak value (see the module doc).
NEVER_ABSTAIN = -math.inf


def never_abstain(cfg: DecoderConfig) -> DecoderConfig:
    """`cfg` with abstaining off: every informative channel gets a position."""
    return dataclasses.replace(cfg, min_peak=NEVER_ABSTAIN)


def _to_numpy(heatmaps) -> np.ndarray:
    if hasattr(heatmaps, "detach"):                     # torch tensor, on any device
        heatmaps = heatmaps.detach().float().cpu().numpy()
    h = np.asarray(heatmaps, dtype=np.float64)
    if h.ndim < 3:
        raise ValueError(f"heatmaps must be (K, H, W) or (B, K, H, W), got shape {h.shape}")
    return h


def _peaks(flat: np.ndarray, min_peak: float):
    """Per channel of (M, H, W): argmax (iy, ix), peak value, and whether the peak is usable."""
    m, h, w = flat.shape
    finite = np.isfinite(flat)
    high = np.where(finite, flat, -np.inf).reshape(m, -1)
    low = np.where(finite, flat, np.inf).reshape(m, -1)
    idx = np.argmax(high, axis=1)
    peak = high[np.arange(m), idx]
    # Constant channel: no location information, even if its value exceeds min_peak.
    ok = np.isfinite(peak) & (peak > low.min(axis=1)) & (peak >= min_peak)
    iy, ix = np.divmod(idx, w)
    return iy, ix, peak, ok


def _finish(points: np.ndarray, peak: np.ndarray, ok: np.ndarray):
    points = np.where(ok[:, None], points, np.nan)
    conf = np.where(ok, peak, 0.0)
    return points, conf


def _batched(fn: Callable[[np.ndarray, DecoderConfig], tuple[np.ndarray, np.ndarray]]) -> Decoder:
    """Lift a decoder on (M, H, W) to any leading shape and a default config."""
    def wrapper(heatmaps, cfg: Optional[DecoderConfig] = None):
        cfg = cfg or DecoderConfig()
        h = _to_numpy(heatmaps)
        lead, (hh, ww) = h.shape[:-2], h.shape[-2:]
        points, conf = fn(h.reshape(-1, hh, ww), cfg)
        return points.reshape(*lead, 2), conf.reshape(lead)
    wrapper.__name__ = fn.__name__.lstrip("_")
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _argmax(flat: np.ndarray, cfg: DecoderConfig):
    """Integer pixel of the maximum."""
    iy, ix, peak, ok = _peaks(flat, cfg.min_peak)
    points = np.stack([ix, iy], axis=1).astype(np.float64)
    return _finish(points, peak, ok)


def _parabola(flat: np.ndarray, cfg: DecoderConfig):
    """Argmax + separable 1-D parabola fits on log values through the 3-neighbourhood."""
    m, h, w = flat.shape
    iy, ix, peak, ok = _peaks(flat, cfg.min_peak)
    n = np.arange(m)
    floor = np.where(ok & (peak > 0), peak, 1.0) * LOG_FLOOR

    def logv(yy, xx):
        v = flat[n, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        v = np.where(np.isfinite(v), v, -np.inf)        # NaN neighbour -> clipped to the floor
        return np.log(np.maximum(v, floor))

    def offset(lo, c, hi, has_both):
        denom = lo - 2.0 * c + hi                        # <= 0 because c is the maximum
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 0.5 * (lo - hi) / denom
        # Plateau (denom 0) or edge pixel: stay on the integer position.
        return np.where(has_both & (denom < 0), d, 0.0)

    c = logv(iy, ix)
    dx = offset(logv(iy, ix - 1), c, logv(iy, ix + 1), (ix > 0) & (ix < w - 1))
    dy = offset(logv(iy - 1, ix), c, logv(iy + 1, ix), (iy > 0) & (iy < h - 1))
    points = np.stack([ix + dx, iy + dy], axis=1)
    return _finish(points, peak, ok)


def _soft_argmax(flat: np.ndarray, cfg: DecoderConfig):
    """Local centroid around the argmax, weights = value - max on the window border, >= 0."""
    m, h, w = flat.shape
    iy, ix, peak, ok = _peaks(flat, cfg.min_peak)
    half = max(int(cfg.window), 1)
    off = np.arange(-half, half + 1)
    ys, xs = iy[:, None] + off, ix[:, None] + off            # (M, 2w+1) each
    vy, vx = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
    win = flat[np.arange(m)[:, None, None], np.clip(ys, 0, h - 1)[:, :, None],
               np.clip(xs, 0, w - 1)[:, None, :]]            # (M, 2w+1, 2w+1)
    valid = vy[:, :, None] & vx[:, None, :] & np.isfinite(win)
    win = np.where(valid, win, -np.inf)
    # Border of the window after clipping to the image.
    y0, y1 = np.maximum(iy - half, 0), np.minimum(iy + half, h - 1)
    x0, x1 = np.maximum(ix - half, 0), np.minimum(ix + half, w - 1)
    on_y = (ys == y0[:, None]) | (ys == y1[:, None])
    on_x = (xs == x0[:, None]) | (xs == x1[:, None])
    border = (on_y[:, :, None] | on_x[:, None, :]) & valid
    t = np.where(border, win, -np.inf).reshape(m, -1).max(axis=1)
    t = np.where(np.isfinite(t), t, np.where(ok, peak, 0.0))  # no finite border: no weights
    weights = np.where(valid, np.maximum(win - t[:, None, None], 0.0), 0.0)
    total = weights.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        cx = (weights * xs[:, None, :]).sum(axis=(1, 2)) / total
        cy = (weights * ys[:, :, None]).sum(axis=(1, 2)) / total
    # A plateau wider than the window leaves no weight: fall back to the argmax pixel.
    has = total > 0
    points = np.stack([np.where(has, cx, ix), np.where(has, cy, iy)], axis=1).astype(np.float64)
    return _finish(points, peak, ok)


def _contour(flat: np.ndarray, cfg: DecoderConfig):
    """Original code: centroid of the largest external contour of the thresholded heatmap."""
    m = flat.shape[0]
    iy, ix, peak, ok = _peaks(flat, cfg.min_peak)
    points = np.full((m, 2), np.nan)
    for i in np.flatnonzero(ok & (peak > 0)):              # contour finding is per image
        channel = np.where(np.isfinite(flat[i]), flat[i], -np.inf)
        binary = (channel >= cfg.contour_threshold * peak[i]).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        largest = max(contours, key=cv2.contourArea)
        moments = cv2.moments(largest)
        if moments["m00"] != 0:
            points[i] = moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]
        else:
            points[i] = largest.reshape(-1, 2).astype(np.float64).mean(axis=0)
    if cfg.min_peak == NEVER_ABSTAIN:
        # No blob (peak <= 0): the argmax pixel rather than a missing point.
        no_blob = ok & ~np.isfinite(points).all(axis=1)
        points[no_blob] = np.stack([ix[no_blob], iy[no_blob]], axis=1)
    ok = ok & np.isfinite(points).all(axis=1)
    return _finish(points, peak, ok)


argmax = _batched(_argmax)
parabola = _batched(_parabola)
soft_argmax = _batched(_soft_argmax)
contour = _batched(_contour)

DECODERS: dict[str, Decoder] = {
    "argmax": argmax,
    "parabola": parabola,
    "soft_argmax": soft_argmax,
    "contour": contour,
}


def decode(heatmaps, cfg: Optional[DecoderConfig] = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode with the decoder named in `cfg` -> (points (..., 2), confidence (...))."""
    cfg = cfg or DecoderConfig()
    if cfg.name not in DECODERS:
        raise ValueError(f"unknown decoder {cfg.name!r}; available: {', '.join(DECODERS)}")
    return DECODERS[cfg.name](heatmaps, cfg)
