"""Where a trained model looks: the share of its input-gradient saliency that falls inside the
anatomical region of interest around the ground-truth landmarks (the attention analysis of
"Self-supervised curricular deep learning for chest x-ray image classification", 2023, which
compares pretraining schemes by how much attention lies on the lungs; here on landmarks).

    ddpm-landmarks attention RUN_OR_EXPORT --data configs/isbi2015.yaml --split test1 --images 20
    analysed = attention_models.load_analysed_model(path)
    summary = analyse(analysed, data_cfg, "test1", out_dir, AttentionConfig(radius=10.0))

Per image, on the model's own grid (its image size and resize mode, the image put there by the
evaluation's deterministic transform):
- saliency s = |d output / d input| per pixel (input gradient, Simonyan et al. 2014), output
  the model's scalar (attention_models.py: heatmap peaks of a regressor, feature norm of a DDPM
  or SSL encoder). Raw, not smoothed;
- ROI = pixel centres within `radius` of a ground-truth landmark, the distance measured in the
  dataset's unit on ORIGINAL pixels (mm with the image's (x, y) spacing where the dataset has
  one, else pixels; metrics.measurement_scale): each model-grid pixel centre is mapped back by
  the sample's exact model -> original matrix, so a disc stays a disc in millimetres whatever
  the stretch. Union of discs by default: it says "near a landmark". roi="hull" adds the convex
  hull of the landmarks (the anatomy they span; on a cephalogram most of the skull, which would
  make "inside" nearly the whole head);
- fraction = sum(s inside) / sum(s) (saliency_fraction), next to the ROI's share of the grid
  (roi_area): a map that ignores anatomy scores its area share, so enrichment = fraction /
  area > 1 is what says the model looks at the landmarks.

Files (out_dir, all written atomically): per_image.csv (id, fraction, roi_area, enrichment,
saliency_sum), summary.json and summary.md (mean +/- sample SD, ddof=1, over images; median,
range), overlays/<id>.png for the first `overlays` images: the image with the ROI outline and
the landmarks, and the saliency heat map over it.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import cv2
import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig, DataConfig
from ddpm_landmarks.data.intensity import to_model_input
from ddpm_landmarks.data.transforms import LandmarkTransform, apply_matrix
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.evaluation import visualize
from ddpm_landmarks.evaluation.metrics import measurement_scale
from ddpm_landmarks.studies.attention_models import AnalysedModel, describe
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

ROI_OUTLINE = (255, 255, 0)     # BGR cyan
OVERLAY_SIDE = 256              # overlay panels are drawn at least this large


@dataclass
class AttentionConfig:
    radius: float = 10.0                # in the dataset's unit (mm where it has spacing)
    roi: Literal["discs", "hull"] = "discs"
    images: int = 20                    # the first N of the split; 0 = all
    overlays: int = 4
    batch_size: int = 8


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------

def saliency_fraction(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the saliency mass inside `mask`: sum(s * mask) / sum(s), for s >= 0 of the
    mask's shape; NaN when s is 0 everywhere. Both sums run over the same array layout, so a
    map entirely inside the mask gives exactly 1.0 and one entirely outside exactly 0.0."""
    s = np.asarray(saliency, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if s.shape != m.shape:
        raise ValueError(f"saliency {s.shape} and mask {m.shape} differ in shape")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("saliency must be finite and >= 0 (e.g. |gradient|)")
    total = s.sum()
    if total == 0:
        return math.nan
    return float(np.where(m, s, 0.0).sum() / total)


def _inside_convex(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) bool: points (N, 2) inside or on the convex polygon (H, 2) (either orientation)."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    cross = ((b[:, 0] - a[:, 0])[None] * (points[:, 1:2] - a[None, :, 1])
             - (b[:, 1] - a[:, 1])[None] * (points[:, 0:1] - a[None, :, 0]))
    eps = 1e-9 * max(1.0, float(np.abs(polygon).max()))
    return (cross >= -eps).all(axis=1) | (cross <= eps).all(axis=1)


def roi_mask(landmarks: np.ndarray, to_original: np.ndarray, scale: tuple[float, float],
             radius: float, size: int, kind: str = "discs") -> np.ndarray:
    """(size, size) bool: model-grid pixels whose centre lies within `radius` of a landmark.

    landmarks: (K, 2) ORIGINAL pixels (NaN = missing, skipped); to_original: the sample's 3x3
    model grid -> original pixels; scale: (sx, sy) dataset units per original pixel (the
    spacing in mm), so the radius is in the dataset's unit. kind="hull" adds the convex hull
    of the landmarks (from three non-collinear ones on)."""
    if not radius > 0:
        raise ConfigError(f"attention radius must be > 0, got {radius}")
    if kind not in ("discs", "hull"):
        raise ConfigError(f"attention roi {kind!r} is not discs | hull")
    cols, rows = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    centres = apply_matrix(np.asarray(to_original, np.float64),
                           np.stack([cols.ravel(), rows.ravel()], axis=1))   # original pixels
    points = np.asarray(landmarks, np.float64)
    points = points[np.isfinite(points).all(axis=1)]
    sx, sy = (float(v) for v in scale)
    inside = np.zeros(len(centres), dtype=bool)
    for x, y in points:
        inside |= ((centres[:, 0] - x) * sx) ** 2 + ((centres[:, 1] - y) * sy) ** 2 <= radius ** 2
    if kind == "hull" and len(points) >= 3:
        hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        if len(hull) >= 3:
            inside |= _inside_convex(centres, hull)
    return inside.reshape(size, size)


def input_saliency(output: Callable[[torch.Tensor], torch.Tensor],
                   images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) |d output_b / d image_b| (summed over input channels), one backward for the
    batch: with the model in eval mode output_b depends on image_b only."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        values = output(x)
        if values.shape != (x.shape[0],):
            raise ValueError(f"model output function gave shape {tuple(values.shape)}, "
                             f"expected ({x.shape[0]},)")
        (grad,) = torch.autograd.grad(values.sum(), x)
    return grad.abs().sum(dim=1).float()


def stats(values: list[float]) -> dict:
    """mean, sample SD (ddof=1), median, min, max, n of the finite values (None if none)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "median": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "n": int(len(v))}


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def overlay_panels(image: np.ndarray, saliency: np.ndarray, mask: np.ndarray,
                   landmarks_grid: np.ndarray, title: str) -> np.ndarray:
    """BGR picture: [image + ROI outline + landmarks | saliency heat map + ROI outline]."""
    size = image.shape[0]
    f = max(1, math.ceil(OVERLAY_SIDE / size))
    big = cv2.resize(image.astype(np.float32), (size * f, size * f), interpolation=cv2.INTER_LINEAR)
    gray = visualize.to_bgr(big)
    top = float(np.percentile(saliency, 99.5)) or float(saliency.max()) or 1.0
    heat = cv2.resize(np.clip(saliency / top, 0, 1).astype(np.float32), (size * f, size * f),
                      interpolation=cv2.INTER_NEAREST)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat_panel = cv2.addWeighted(gray, 0.45, colour, 0.55, 0.0)
    outline = cv2.resize(mask.astype(np.uint8), (size * f, size * f),
                         interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = (np.asarray(landmarks_grid, np.float64) + 0.5) * f - 0.5   # pixel-centre rescale
    panels = []
    for canvas in (gray.copy(), heat_panel):
        cv2.drawContours(canvas, contours, -1, ROI_OUTLINE, 1, cv2.LINE_AA)
        visualize.draw_points(canvas, points, visualize.GT_COLOUR, numbered=False, radius=3)
        panels.append(canvas)
    picture = np.hstack([panels[0], np.full((size * f, 4, 3), 255, np.uint8), panels[1]])
    scale = max(0.4, picture.shape[1] / 1100)
    band = np.zeros((int(26 * scale / 0.5), picture.shape[1], 3), np.uint8)   # title strip
    cv2.putText(band, title, (4, int(18 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([band, picture])


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

@dataclass
class ImageAttention:
    id: str
    fraction: float
    roi_area: float
    saliency_sum: float

    @property
    def enrichment(self) -> float:
        return self.fraction / self.roi_area if self.roi_area > 0 else math.nan


def analyse(analysed: AnalysedModel, data_cfg: DataConfig, split: str, out_dir: Path,
            cfg: AttentionConfig = AttentionConfig()) -> dict:
    """Saliency fractions of the first cfg.images images of `split`; writes the files of the
    module docstring into out_dir and returns summary.json's content."""
    from ddpm_landmarks.data.registry import build_dataset
    dataset = build_dataset(data_cfg)
    if split not in dataset.splits:
        raise ConfigError(f"split {split!r} not in {dataset.name}; its splits: "
                          f"{', '.join(dataset.splits)}")
    images = dataset.split(split)
    count = len(images) if cfg.images <= 0 else min(cfg.images, len(images))
    # The model's own grid; no augmentation (and so no flip: no permutation needed).
    grid = dataclasses.replace(data_cfg, image_size=analysed.image_size,
                               resize_mode=analysed.resize_mode)
    transform = LandmarkTransform(grid, AugmentConfig(flip_prob=0.0), train=False,
                                  dataset_name=images.name)
    device = next(analysed.model.parameters()).device
    out_dir = Path(out_dir)
    rows: list[ImageAttention] = []
    unit = images.unit
    for start in range(0, count, cfg.batch_size):
        samples = [images[i] for i in range(start, min(count, start + cfg.batch_size))]
        moved = [transform(s) for s in samples]
        batch = torch.from_numpy(np.stack([to_model_input(t.image, grid.intensity_norm)
                                           for t in moved]))[:, None]
        saliency = input_saliency(analysed.output, batch.float().to(device)).cpu().numpy()
        for sample, t, s in zip(samples, moved, saliency):
            try:
                scale, unit = measurement_scale(images, sample)
            except ValueError as err:
                raise DataError(str(err)) from None
            if not np.isfinite(sample.landmarks).all(axis=1).any():
                log.warning("%s: no ground-truth landmark, skipped", sample.id)
                continue
            mask = roi_mask(sample.landmarks, t.to_original, scale, cfg.radius,
                            analysed.image_size, cfg.roi)
            row = ImageAttention(sample.id, saliency_fraction(s, mask), float(mask.mean()),
                                 float(s.sum()))
            rows.append(row)
            if len(rows) <= cfg.overlays:
                title = (f"{sample.id}: {row.fraction:.0%} of saliency in ROI "
                         f"({row.roi_area:.0%} of the image)")
                picture = overlay_panels(t.image, s, mask, t.landmarks, title)
                visualize.write_png(out_dir / "overlays" / f"{sample.id}.png", picture)
    if not rows:
        raise DataError(f"{images.name}: none of the first {count} images has a landmark")
    summary = {**describe(analysed), "dataset": images.name, "split": split, "images": len(rows),
               "roi": {"kind": cfg.roi, "radius": cfg.radius, "unit": unit},
               "saliency": "input gradient |d output / d input|, raw",
               "fraction": stats([r.fraction for r in rows]),
               "roi_area": stats([r.roi_area for r in rows]),
               "enrichment": stats([r.enrichment for r in rows]),
               "sd": "sample SD over images (ddof=1)",
               "no_saliency": sum(not math.isfinite(r.fraction) for r in rows)}
    write_outputs(rows, summary, out_dir)
    return summary


def _fmt(stat: dict, pct: bool) -> str:
    if stat["mean"] is None:
        return "-"
    mean, sd = stat["mean"], stat["sd"]
    if pct:
        return f"{100 * mean:.1f}% ± {100 * sd:.1f}" if sd is not None else f"{100 * mean:.1f}%"
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def summary_markdown(summary: dict) -> str:
    roi = summary["roi"]
    return "\n".join([
        f"# Attention of {summary['weights']}",
        "",
        f"{summary['kind']}: saliency = |d output / d input|, output = {summary['output']}; "
        f"{summary['images']} images of {summary['dataset']} on its {summary['image_size']} px "
        f"grid; ROI = {roi['kind']} of radius {roi['radius']:g} {roi['unit']} around the "
        f"ground-truth landmarks. Mean ± sample SD over images.",
        "",
        "| saliency in ROI | ROI share of the image | enrichment (fraction / area) | n |",
        "|---|---|---|---|",
        f"| {_fmt(summary['fraction'], True)} | {_fmt(summary['roi_area'], True)} | "
        f"{_fmt(summary['enrichment'], False)} | {summary['fraction']['n']} |",
        ""])


def write_outputs(rows: list[ImageAttention], summary: dict, out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "fraction", "roi_area", "enrichment", "saliency_sum"])
    for r in rows:
        writer.writerow([r.id] + [f"{v:.6g}" if math.isfinite(v) else "" for v in
                                  (r.fraction, r.roi_area, r.enrichment, r.saliency_sum)])
    atomic_write_text(out_dir / "per_image.csv", buffer.getvalue())
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary))


def default_out_dir(analysed: AnalysedModel, split: str, explicit: Optional[str]) -> Path:
    """--out, else attention_<split>/ next to the weights (the run folder for best/ export/)."""
    if explicit:
        return Path(explicit)
    base = analysed.source.parent if analysed.source.name in ("best", "export") else analysed.source
    return base / f"attention_{split}"
