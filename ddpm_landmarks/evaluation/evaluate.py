"""Turn predictions in original pixels into the field's numbers, files and overlay images.

Every predictor (the trivial mean shape now, heatmap regressors later) ends here: it hands over
predictions already mapped back to ORIGINAL pixels as floats, one (K, 2) array per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import EvalConfig
from ddpm_landmarks.data.image_io import image_size
from ddpm_landmarks.data.sample import (
    LandmarkDataset,
    LandmarkSample,
    original_to_stored,
)
from ddpm_landmarks.evaluation import visualize
from ddpm_landmarks.evaluation.metrics import (
    measurement_scale,
    radial_errors,
    summarize,
    write_results,
)
from ddpm_landmarks.evaluation.released_convention import (
    RELEASED_RADII,
    released_errors,
)


@dataclass
class GroundTruth:
    """What evaluation needs of an image: its points, spacing and original grid, no pixels."""
    id: str
    landmarks: np.ndarray                 # (K, 2) original pixels
    spacing_mm: Optional[tuple[float, float]]
    original_size: Optional[tuple[int, int]]   # None: the stored file is the original grid

    @classmethod
    def of(cls, sample: LandmarkSample) -> "GroundTruth":
        return cls(sample.id, sample.landmarks, sample.spacing_mm, sample.original_size)


def ground_truths(dataset: LandmarkDataset, indices: Optional[Sequence[int]] = None
                  ) -> list[GroundTruth]:
    """Ground truth of `dataset`'s images (all, or those at `indices`) from its records: no
    image is decoded, except for the size of a file that is its own original grid when the
    error unit needs it (pixels of a reference grid, "px@WxH")."""
    records = dataset.records if indices is None else [dataset.records[i] for i in indices]
    needs_size = dataset.unit not in ("mm", "px")
    out = []
    for r in records:
        size = r.original_size
        if size is None and needs_size:
            size = image_size(r.image_path)
        out.append(GroundTruth(r.id, r.landmarks.copy(), r.spacing_mm, size))
    return out


def sdr_thresholds(dataset: LandmarkDataset, cfg: EvalConfig) -> list[float]:
    return list(cfg.sdr_thresholds) if cfg.sdr_thresholds is not None else dataset.sdr_thresholds_mm


def evaluate_predictions(dataset: LandmarkDataset, truths: Sequence[GroundTruth],
                         predictions: np.ndarray, cfg: EvalConfig,
                         out_dir: Optional[Path] = None, extra: Optional[dict] = None,
                         confidence: Optional[np.ndarray] = None,
                         extra_columns: Optional[dict[str, np.ndarray]] = None) -> dict:
    """Radial errors per image/landmark in the dataset's unit, summary, and result files
    (`confidence` and `extra_columns` (N, K) become predictions.csv columns)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    gt = np.stack([t.landmarks for t in truths])
    scales, units = zip(*(measurement_scale(dataset, t) for t in truths))
    errors = radial_errors(predictions, gt, np.asarray(scales))
    summary = summarize(errors, sdr_thresholds(dataset, cfg), cfg.sdr_inclusive)
    summary["unit"] = units[0]
    if out_dir is not None:
        write_results(out_dir, [t.id for t in truths], dataset.landmark_names, predictions, gt,
                      errors, summary, units[0], extra=extra, confidence=confidence,
                      extra_columns=extra_columns)
    summary["errors"] = errors
    return summary


RELEASED_POLICY = ("released convention (Di Via et al., WACV 2025, downstream_task/metrics.py; "
                   "evaluation/released_convention.py): 256 x 256 grid, points rounded to it, "
                   "ground truth re-extracted from its target disc, a missing prediction "
                   "scored at (0, 0), the released spacing rule, SDR counts error <= t")


def evaluate_released(dataset: LandmarkDataset, truths: Sequence[GroundTruth],
                      predictions: np.ndarray, out_dir: Optional[Path] = None,
                      extra: Optional[dict] = None) -> dict:
    """evaluate_predictions in the released code's convention (evaluation/released_convention.py):
    the same summary keys and files, labelled "convention": "released"."""
    by_id = {r.id: r for r in dataset.records}
    sizes = [t.original_size or image_size(by_id[t.id].image_path) for t in truths]
    gt = np.stack([t.landmarks for t in truths])
    errors, unit = released_errors(predictions, gt, sizes, dataset.name.split(":")[0])
    summary = summarize(errors, RELEASED_RADII, inclusive=True)
    summary["unit"] = unit
    if out_dir is not None:
        write_results(out_dir, [t.id for t in truths], dataset.landmark_names, predictions, gt,
                      errors, summary, unit, extra={**(extra or {}), "convention": "released",
                                                    "policy": RELEASED_POLICY})
    summary["errors"] = errors
    return summary


def format_summary(summary: dict, title: str = "") -> str:
    """A small Markdown table: MRE +/- SD, median, SDR per threshold, misses."""
    unit = summary["unit"]
    thresholds = summary["thresholds"]
    head = ["MRE", "SD", "median"] + [f"SDR {t:g}" for t in thresholds] + ["n", "missed"]
    sdr = [f"{summary['sdr'][t]:.2f}%" for t in thresholds]
    row = [f"{summary['mre']:.3f}", f"{summary['sd']:.3f}", f"{summary['median']:.3f}"] + sdr + \
          [str(summary["n"]), str(summary["missed"])]
    lines = [f"{title} (errors in {unit})" if title else f"errors in {unit}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    return "\n".join(lines)


def write_overlays(dataset: LandmarkDataset, truths: Sequence[GroundTruth], predictions: np.ndarray,
                   errors: np.ndarray, out_dir: Path, count: int = 3,
                   regions: Optional[np.ndarray] = None) -> list[Path]:
    """Overlay PNGs of the best and worst images: ground truth green and numbered, prediction
    red and labelled "index:error" in the dataset's unit, image MRE in the title. `regions`
    (N, K, 2): semi-axes in original pixels of each prediction's region (conformal radius),
    drawn as red circles / ellipses."""
    per_image = np.array([np.nanmean(np.where(np.isinf(e), np.nan, e)) if np.isfinite(e).any()
                          else np.inf for e in errors])
    order = np.argsort(per_image)
    chosen = [("best", i) for i in order[:count]] + [("worst", i) for i in order[::-1][:count]]
    by_id = {r.id: k for k, r in enumerate(dataset.records)}
    written = []
    for rank, i in chosen:
        sample = dataset[by_id[truths[i].id]]
        scale = sample.stored_scale
        # Drawn on the stored image: map both point sets from original to stored pixels.
        title = f"{sample.id}  MRE {per_image[i]:.2f} {dataset.unit}"
        image = visualize.overlay(sample.image, gt=original_to_stored(truths[i].landmarks, scale),
                                  pred=original_to_stored(predictions[i], scale), title=title,
                                  errors=errors[i],
                                  regions=None if regions is None else regions[i] * scale)
        written.append(visualize.write_png(out_dir / f"{rank}_{sample.id}.png", image))
    return written
