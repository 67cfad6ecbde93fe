"""Test-time augmentation for the `tta` uncertainty score: the same image, slightly moved,
predicted again; how far the answers scatter once mapped back says how sure the model is.

    jitters = tta_matrices(cfg.uncertainty, size)       # 3x3 model grid -> jittered grid
    estimator = TTAEstimator(base, jitters, flip_permutation)   # base: any LandmarkEstimator

Each view v is a 3x3 matrix T_v acting on model-grid points (pixel-centre convention, as every
matrix of data/transforms.py): the image is warped with T_v (data.transforms.warp_image, the
warp the training augmentation uses; outside the image = 0 on the [0, 1] scale, i.e. -1 on the
model's [-1, 1] input, as the dataset pads), the base estimator predicts on the warped grid,
and its points are mapped back with the exact inverse T_v^-1 in float64. The mirrored view
(x -> S - 1 - x, its own inverse) exists only with the dataset's left/right permutation: the
point of landmark i is read from the mirrored output's landmark perm[i], as flip TTA averages
heatmaps (inference/predictor.py). The jitters are a seeded draw of small rotations, scales and
translations about the grid centre, the same for every image.

The views only score; the reported point is the un-augmented one (view 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig, UncertaintyConfig
from ddpm_landmarks.data.transforms import (
    apply_matrix,
    flip_matrix,
    random_affine_matrix,
    warp_image,
)
from ddpm_landmarks.inference.uncertainty import GridEstimates, LandmarkEstimator


def tta_matrices(cfg: UncertaintyConfig, size: int) -> list[np.ndarray]:
    """cfg.tta_jitters seeded affine jitters (rotation, isotropic scale, translation) of a
    size x size grid, drawn as the training augmentation draws them."""
    jitter = AugmentConfig(rotation_deg=cfg.tta_rotation_deg, scale=tuple(cfg.tta_scale),
                           translate=cfg.tta_translate, shear_deg=0.0)
    rng = np.random.default_rng([int(cfg.tta_seed), int(size)])
    return [random_affine_matrix(rng, jitter, size) for _ in range(int(cfg.tta_jitters))]


def warp_batch(images: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """(B, 1, S, S) model-grid images in [-1, 1] warped by `matrix` (grid -> grid)."""
    size = images.shape[-1]
    unit = ((images.detach().float().cpu().numpy() + 1.0) * 0.5)[:, 0]
    warped = np.stack([warp_image(im, matrix, size) for im in unit])
    return torch.from_numpy(warped * 2.0 - 1.0).unsqueeze(1).to(images.device, images.dtype)


def map_back(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points predicted on the grid warped by `matrix` -> the un-warped grid (exact inverse)."""
    return apply_matrix(np.linalg.inv(np.asarray(matrix, dtype=np.float64)), points)


def unflip(points: np.ndarray, size: int, permutation: Sequence[int]) -> np.ndarray:
    """(B, K, 2) points predicted on the mirrored grid -> the original grid and labels."""
    mirrored = apply_matrix(flip_matrix(size), points)          # the flip is its own inverse
    return mirrored[:, np.asarray(permutation, dtype=np.int64)]


class TTAEstimator:
    """Wraps any LandmarkEstimator: view 0 is the base estimate, then one view per jitter
    matrix and, with a permutation, the mirrored image."""

    def __init__(self, base: LandmarkEstimator, jitters: Sequence[np.ndarray],
                 flip_permutation: Optional[Sequence[int]] = None):
        self.base = base
        self.jitters = [np.asarray(m, dtype=np.float64) for m in jitters]
        self.permutation = None if flip_permutation is None else list(flip_permutation)

    @property
    def num_views(self) -> int:
        return 1 + len(self.jitters) + (self.permutation is not None)

    def estimate(self, images: torch.Tensor) -> GridEstimates:
        first = self.base.estimate(images)
        views = [first.points]
        for matrix in self.jitters:
            views.append(map_back(self.base.estimate(warp_batch(images, matrix)).points, matrix))
        if self.permutation is not None:
            mirrored = self.base.estimate(torch.flip(images, dims=[-1])).points
            views.append(unflip(mirrored, images.shape[-1], self.permutation))
        return GridEstimates(first.points, first.peak, first.covariance, np.stack(views))


def tta_estimator(base: LandmarkEstimator, cfg: UncertaintyConfig, size: int,
                  flip_permutation: Optional[Sequence[int]]) -> TTAEstimator:
    """The configured TTA views: cfg's jitters, plus the mirror when cfg.tta_flip and the
    dataset has a left/right permutation."""
    return TTAEstimator(base, tta_matrices(cfg, size),
                        flip_permutation if cfg.tta_flip else None)


def tta_views(estimator) -> int:
    """Number of TTA views of an estimator (0 without TTA): part of the tta score's definition."""
    return int(getattr(estimator, "num_views", 0))
