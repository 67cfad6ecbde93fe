"""Per-landmark uncertainty scores from the model's own outputs, in the error unit.

Any predictor plugs in through one small interface: for a batch of model-grid images it
returns its points, their decoded peak and the heatmap spread on the model grid
(GridEstimates); the batch carries each image's exact model -> original matrix. A two-stage
run (a refinement network on a high-resolution patch per landmark, inference/two_stage.py)
gives its final points in original pixels with the covariance of the heatmap behind each:
the patch heatmap's with its exact patch -> original matrix where the point was refined,
stage 1's with the model -> original matrix where it was kept (two_stage_scales); the same
formulas then apply, per landmark.

    estimator = HeatmapEstimator(run.predictor(permutation), cfg.uncertainty, cfg.heatmap)
    estimator = TTAEstimator(estimator, ...)            # opt-in: inference/tta.py
    result = estimate_dataset(estimator, heatmap_dataset, unit_scales, cfg.uncertainty)
    result.points, result.peak, result.scales["spread"]  # original px; (N, K) in mm / px

Scores, each turned into a positive scale u, larger = less sure (the conformal regions are
r = q * u, evaluation/conformal.py):
- none:   u = 1: one radius per landmark (plain split conformal).
- peak:   u = 1 / max(peak, floor): the decoded heatmap peak (the `confidence` of predict).
- spread: u = sqrt(trace(C)), C the heatmap's covariance (heatmaps/spread.py) mapped to the
          error unit: C_unit = D A C_grid A^T D, A = the model -> original matrix's linear part,
          D = diag(unit per original pixel (x, y)). The radial RMS spread, in mm.
- tta:    u = sqrt(mean_v |D (p_v - mean p)|^2) over the test-time-augmented views (the
          un-augmented one included), each view's points mapped back EXACTLY to original
          pixels first. Needs a TTAEstimator (extra forward passes).
Scales below `floor` (cfg.score_floor) are raised to it; an undefined one (flat heatmap) is
NaN, i.e. unknown (an infinite radius). The points themselves are those of the un-augmented
prediction: scores never move a point, so predict / evaluate report the same points with or
without them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from ddpm_landmarks.config.common import HeatmapConfig, UncertaintyConfig
from ddpm_landmarks.data.transforms import map_to_original
from ddpm_landmarks.heatmaps.decoders import decode
from ddpm_landmarks.heatmaps.spread import auto_window, spread_covariance

SCORES = ("none", "peak", "spread", "tta")
# Scores measured in the error unit (mm / px): their conformal q is a pure number, so a radius
# can be given in a file's pixels without knowing its spacing. none and peak carry no length:
# q itself is in the unit.
LENGTH_SCORES = ("spread", "tta")


@dataclass
class GridEstimates:
    """A predictor's output for a batch, on the model grid (pixel-centre convention)."""
    points: np.ndarray                    # (B, K, 2); NaN = no usable peak
    peak: np.ndarray                      # (B, K) decoded peak (predict's confidence)
    covariance: np.ndarray                # (B, K, 2, 2) heatmap spread, model-grid px^2
    views: Optional[np.ndarray] = None    # (V, B, K, 2) TTA views mapped back to the model grid


class LandmarkEstimator(Protocol):
    def estimate(self, images: torch.Tensor) -> GridEstimates:
        """(B, 1, S, S) model-grid images in [-1, 1] -> GridEstimates on that grid."""


class HeatmapEstimator:
    """A HeatmapPredictor's heatmaps, decoded with its decoder (the same points as
    predictor(images)) plus their spread."""

    def __init__(self, predictor, cfg: UncertaintyConfig, heatmap_cfg: HeatmapConfig):
        self.predictor = predictor
        self.method = cfg.spread
        self.window = cfg.window or auto_window(heatmap_cfg)

    def estimate(self, images: torch.Tensor) -> GridEstimates:
        maps = self.predictor.heatmaps(images)
        points, peak = decode(maps, self.predictor.decoder_cfg)
        return GridEstimates(points, peak, spread_covariance(maps, self.method, self.window))


@dataclass
class Estimates:
    """Per image and landmark, after mapping to original pixels."""
    indices: list[int]                    # dataset item indices
    points: np.ndarray                    # (N, K, 2) original pixels
    peak: np.ndarray                      # (N, K)
    scales: dict[str, np.ndarray]         # score name -> (N, K) scale u (see module doc)
    two_stage: Optional[object] = None    # a refinement run's TwoStageOutput (stage 1 too)


def _linear(to_original: np.ndarray, k: int) -> np.ndarray:
    """(B, K, 2, 2) linear parts of (B, 3, 3) or per-landmark (B, K, 3, 3) matrices."""
    m = np.asarray(to_original, dtype=np.float64)
    a = m[..., :2, :2]
    return np.broadcast_to(a[:, None], (m.shape[0], k, 2, 2)) if m.ndim == 3 else a


def _map_points(points: np.ndarray, to_original: np.ndarray) -> np.ndarray:
    """(B, K, 2) model-grid points -> original pixels with (B, 3, 3) or (B, K, 3, 3)."""
    m = np.asarray(to_original, dtype=np.float64)
    if m.ndim == 3:
        return np.stack([map_to_original(p, t) for p, t in zip(points, m)])
    return np.einsum("bkij,bkj->bki", m[..., :2, :2], points) + m[..., :2, 2]


def spread_in_unit(covariance: np.ndarray, to_original: np.ndarray,
                   unit_scale: np.ndarray) -> np.ndarray:
    """(B, K) radial RMS spread sqrt(trace(D A C A^T D)) in the error unit."""
    a = _linear(to_original, covariance.shape[1])
    d = np.asarray(unit_scale, dtype=np.float64)[:, None, :, None] * a   # D A, D per image
    c = d @ covariance @ np.swapaxes(d, -1, -2)
    return np.sqrt(np.trace(c, axis1=-2, axis2=-1))


def tta_in_unit(views: np.ndarray, to_original: np.ndarray, unit_scale: np.ndarray) -> np.ndarray:
    """(B, K) RMS distance of the views' original-pixel points to their mean, in the unit."""
    mapped = np.stack([_map_points(v, to_original) for v in views])      # (V, B, K, 2)
    deviation = (mapped - mapped.mean(axis=0)) * np.asarray(unit_scale)[None, :, None, :]
    return np.sqrt((deviation ** 2).sum(axis=-1).mean(axis=0))


def score_scales(grid: GridEstimates, to_original: np.ndarray, unit_scale: np.ndarray,
                 floor: float) -> dict[str, np.ndarray]:
    """{score: (B, K) scale u} for every score the estimates allow (tta only with views)."""
    def floored(u):
        return np.where(np.isnan(u), np.nan, np.maximum(u, floor))

    peak = np.asarray(grid.peak, dtype=np.float64)
    scales = {"none": np.ones_like(peak),
              "peak": 1.0 / np.maximum(np.where(np.isfinite(peak), peak, floor), floor),
              "spread": floored(spread_in_unit(grid.covariance, to_original, unit_scale))}
    if grid.views is not None:
        scales["tta"] = floored(tta_in_unit(grid.views, to_original, unit_scale))
    return scales


def two_stage_scales(out, unit_scale: np.ndarray, floor: float) -> dict[str, np.ndarray]:
    """{score: (B, K) scale u} of a two-stage run's final points (TwoStageOutput with its
    spread): peak = 1 / the final point's decoded peak; spread = the local heatmap's spread
    through its patch -> original matrix where the point was refined, else stage 1's through
    the model grid -> original matrix. No tta score (not built for two stages)."""
    if out.stage1_covariance is None:
        raise ValueError("two_stage_scales needs a TwoStagePredictor made with spread settings")
    # score_scales reads the peak and the covariance only (the points here are original px).
    grid = GridEstimates(out.final, out.final_peak, out.stage1_covariance)
    scales = score_scales(grid, out.model_to_original, unit_scale, floor)
    refined = np.isfinite(out.patch_covariance).all(axis=(-2, -1))
    if refined.any():
        matrices = np.where(refined[..., None, None], out.patch_to_original, np.eye(3))
        covariance = np.where(refined[..., None, None], out.patch_covariance, 0.0)
        local = np.maximum(spread_in_unit(covariance, matrices, unit_scale), floor)
        scales["spread"] = np.where(refined, local, scales["spread"])
    return scales


def estimate_dataset(estimator: LandmarkEstimator, dataset,
                     unit_scales: Callable[[list[int]], np.ndarray], floor: float,
                     batch_size: int = 16, num_workers: int = 0) -> Estimates:
    """Run over a HeatmapDataset(train=False) like predict_dataset, plus the scales.
    `unit_scales(indices)` gives (B, 2) error-unit per original pixel (x, y) of those items."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    indices, points, peaks, scales = [], [], [], []
    for batch in loader:
        grid = estimator.estimate(batch["image"])
        to_original = batch["to_original"].numpy()
        items = [int(i) for i in batch["index"]]
        points.append(_map_points(grid.points, to_original))
        peaks.append(np.asarray(grid.peak, dtype=np.float64))
        scales.append(score_scales(grid, to_original, unit_scales(items), floor))
        indices.extend(items)
    return Estimates(indices, np.concatenate(points), np.concatenate(peaks),
                     {name: np.concatenate([s[name] for s in scales]) for name in scales[0]})
