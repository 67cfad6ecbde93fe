"""Drawing landmarks on x-rays: dataset previews and prediction overlays (PNG via OpenCV)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from ddpm_landmarks.utils.atomic import atomic_path

GT_COLOUR = (80, 220, 80)       # BGR green: ground truth
PRED_COLOUR = (60, 60, 255)     # BGR red: prediction


def to_bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def _cv_point(p: np.ndarray, shift: int = 4) -> tuple[int, int]:
    # OpenCV draws with integer coordinates; `shift` fractional bits keep the sub-pixel position.
    return int(round(p[0] * (1 << shift))), int(round(p[1] * (1 << shift)))


def draw_points(canvas: np.ndarray, points: np.ndarray, colour: tuple[int, int, int],
                numbered: bool = True, radius: Optional[int] = None,
                labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """Draw (K, 2) points (canvas pixels, NaN skipped) as dots with their 0-based index
    (or with `labels[k]` when given)."""
    h, w = canvas.shape[:2]
    radius = radius or max(2, round(min(h, w) / 150))
    font_scale = max(0.3, min(h, w) / 700)
    for k, p in enumerate(np.asarray(points, dtype=np.float64)):
        if np.isnan(p).any():
            continue
        cv2.circle(canvas, _cv_point(p), radius << 4, colour, -1, cv2.LINE_AA, shift=4)
        if numbered or labels is not None:
            text = labels[k] if labels is not None else str(k)
            org = (int(p[0]) + radius + 1, int(p[1]) - radius - 1)
            cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                        3, cv2.LINE_AA)
            cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1,
                        cv2.LINE_AA)
    return canvas


def draw_regions(canvas: np.ndarray, points: np.ndarray, axes: np.ndarray,
                 colour: tuple[int, int, int] = PRED_COLOUR) -> np.ndarray:
    """Outline an axis-aligned ellipse of semi-axes `axes` (K, 2) (canvas pixels; a circle
    when equal) around each of the (K, 2) points; NaN points and non-finite axes skipped."""
    for p, a in zip(np.asarray(points, dtype=np.float64), np.asarray(axes, dtype=np.float64)):
        if np.isfinite(p).all() and np.isfinite(a).all():
            size = _cv_point(a)
            cv2.ellipse(canvas, _cv_point(p), (max(size[0], 1), max(size[1], 1)), 0.0, 0.0,
                        360.0, colour, 1, cv2.LINE_AA, shift=4)
    return canvas


def overlay(image: np.ndarray, gt: Optional[np.ndarray] = None, pred: Optional[np.ndarray] = None,
            title: str = "", errors: Optional[np.ndarray] = None,
            regions: Optional[np.ndarray] = None) -> np.ndarray:
    """Image with ground truth (green, numbered), prediction (red) and a line joining each pair.
    With `errors` (K,) each prediction is labelled "index:error" (a miss has no dot); with
    `regions` (K, 2) each prediction gets its region's outline (semi-axes in image pixels)."""
    canvas = to_bgr(image)
    if pred is not None and regions is not None:
        draw_regions(canvas, pred, regions)
    if gt is not None and pred is not None:
        for g, p in zip(gt, pred):
            if not (np.isnan(g).any() or np.isnan(p).any()):
                cv2.line(canvas, _cv_point(g), _cv_point(p), (0, 220, 255), 1, cv2.LINE_AA, shift=4)
    if gt is not None:
        draw_points(canvas, gt, GT_COLOUR)
    if pred is not None:
        labels = None
        if errors is not None:
            labels = [f"{k}:{e:.1f}" if np.isfinite(e) else f"{k}:-" for k, e in enumerate(errors)]
        draw_points(canvas, pred, PRED_COLOUR, numbered=gt is None, labels=labels)
    if title:
        scale = max(0.35, canvas.shape[1] / 900)
        cv2.putText(canvas, title, (4, int(18 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def grid(tiles: Sequence[np.ndarray], columns: int = 4, tile_height: int = 320) -> np.ndarray:
    """Tile BGR images of different sizes into one picture, each scaled to `tile_height`."""
    if not tiles:
        raise ValueError("nothing to draw")
    scaled = []
    for t in tiles:
        w = max(1, round(t.shape[1] * tile_height / t.shape[0]))
        scaled.append(cv2.resize(t, (w, tile_height), interpolation=cv2.INTER_AREA))
    width = max(t.shape[1] for t in scaled)
    rows = []
    for start in range(0, len(scaled), columns):
        row = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in scaled[start:start + columns]]
        row += [np.zeros_like(row[0])] * (columns - len(row))
        rows.append(np.hstack(row))
    return np.vstack(rows)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return path
