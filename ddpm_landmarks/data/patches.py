"""Patches for the refinement stage: a P x P grid around a point, finer than the stage-1 model
grid, as 3x3 matrices in the conventions of data/transforms.py (pixel centres, one matrix moves
image and points alike, float64, exact inverse).

    pixel = patch_pixel(sample.original_size, grid=512)     # original px per patch pixel
    m = patch_matrix(centre, pixel, size=64)                  # original pixels -> patch
    patch = cut_patch(sample.image, stored_to_original(sample), m, 64)
    points_original = apply_matrix(np.linalg.inv(m), points_on_patch)   # exact way back

The patch grid is isotropic in ORIGINAL pixels and tied to the image's extent: one patch pixel
is long side / `grid` original pixels, so a patch of the same anatomy is the same whether the
file is the 1935 x 2400 original or its 413 x 512 copy (grid 512 = the copy's own pixels).
The patch centre (the point) sits at ((P - 1) / 2, (P - 1) / 2). shared_patches: one centre
for several nearby points (landmarks that share a patch at inference, refine.share_radius).

PatchDataset: the training items of the local network, one per (labelled image, landmark):
the patch cut around the ground truth moved by a random jitter (the stage-1 error it must
undo), rotated / scaled / sheared about its centre (the augment section; its translation is
replaced by the jitter), with intensity augmentation, and the heatmap targets of the landmarks
on it (only the patch's own landmark, or every visible one, supervised: `supervise`), or with
own_channel_only just the patch's landmark as one channel (a landmark-conditioned network).
With share_radius r (patch pixels) the centre is moved further, uniformly within r: a patch
shared by nearby landmarks at inference shows each up to r from its centre.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig, HeatmapConfig
from ddpm_landmarks.data.intensity import random_intensity
from ddpm_landmarks.data.randomness import ItemRandomness
from ddpm_landmarks.data.sample import LandmarkDataset, LandmarkSample
from ddpm_landmarks.data.transforms import (
    apply_matrix,
    original_to_stored_matrix,
    random_affine_matrix,
    resize_matrix,
    scale_matrix,
    translation_matrix,
    warp_image,
)
from ddpm_landmarks.heatmaps.targets import make_targets


def patch_pixel(original_wh: Sequence[float], grid: int) -> float:
    """Original pixels per patch pixel: the long side of the image over `grid`."""
    if grid < 1:
        raise ValueError(f"refine.grid must be >= 1 patch pixels across the image, got {grid}")
    return float(max(original_wh)) / float(grid)


def patch_matrix(centre: Sequence[float], pixel: float, size: int) -> np.ndarray:
    """Original pixels -> a size x size patch of `pixel` original px per patch pixel, with
    `centre` (original px) at the patch centre ((size - 1) / 2, (size - 1) / 2)."""
    c = (size - 1) / 2.0
    return (translation_matrix(c, c) @ scale_matrix(1.0 / pixel, 1.0 / pixel)
            @ translation_matrix(-float(centre[0]), -float(centre[1])))


def shared_patches(points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 2) of one image -> (centres (m, 2), member (n,): the centre each point is
    read around), every point within `radius` (the points' unit) of its centre. Greedy cover:
    candidate centres are the points and the midpoints of every pair; the one covering the
    most points not yet covered is taken (ties: the first), until all are. radius 0: every
    point its own centre (one patch per landmark, as without sharing)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if radius <= 0 or n < 2:
        return points.copy(), np.arange(n)
    first, second = np.triu_indices(n, k=1)
    candidates = np.concatenate([points, 0.5 * (points[first] + points[second])])
    covers = np.linalg.norm(candidates[:, None] - points[None], axis=-1) <= radius   # (C, n)
    member = np.full(n, -1)
    centres = []
    while (member < 0).any():
        best = int(np.argmax(covers[:, member < 0].sum(axis=1)))
        member[covers[best] & (member < 0)] = len(centres)
        centres.append(candidates[best])
    return np.stack(centres), member


def stored_to_original(sample: LandmarkSample) -> np.ndarray:
    """3x3 stored-image pixels -> original pixels (identity when the file is the original)."""
    stored_wh = (sample.image.shape[1], sample.image.shape[0])
    return np.linalg.inv(original_to_stored_matrix(sample.original_size, stored_wh))


def cut_patch(image: np.ndarray, image_to_original: np.ndarray, original_to_patch: np.ndarray,
              size: int) -> np.ndarray:
    """float32 (size, size) patch of `image` (stored pixels) through one warp (antialiased when
    the patch is coarser than the image; 0 outside the image)."""
    return warp_image(image, original_to_patch @ image_to_original, size)


def on_patch_grid(image: np.ndarray, image_to_original: np.ndarray,
                  original_wh: Sequence[float], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, its exact map to original pixels), area-resized to about the patch grid when the
    grid is coarser than the image: one antialiasing resize per image instead of one per patch
    (warp_image would resize the whole image for every patch). Finer grids: unchanged."""
    pixel = patch_pixel(original_wh, grid)
    h, w = image.shape[:2]
    # Original pixels per image pixel along each image axis, over original px per patch pixel.
    factors = np.minimum(1.0, np.linalg.norm(image_to_original[:2, :2], axis=0) / pixel)
    size = (max(1, int(round(w * factors[0]))), max(1, int(round(h * factors[1]))))
    if size == (w, h):
        return image, image_to_original
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), size,
                         interpolation=cv2.INTER_AREA)
    return resized, image_to_original @ np.linalg.inv(resize_matrix((w, h), size, "stretch"))


class PatchDataset(ItemRandomness, torch.utils.data.Dataset):
    """Training patches of the local network (module doc). Items are dicts like
    HeatmapDataset's ({"image", "heatmaps", "mask", "landmarks", "to_original", "index"}) plus
    "landmark" (the patch's landmark); "to_original" maps the PATCH to original pixels.

    jitter_px: (N, K, 2) standard deviation of the patch-centre jitter in original pixels per
    image, landmark and axis (the refinement run converts its unit to each image's pixels).
    Images are decoded once and kept (N is small).
    """

    def __init__(self, dataset: LandmarkDataset, aug_cfg: AugmentConfig,
                 heatmap_cfg: HeatmapConfig, patch_size: int, grid: int,
                 jitter_px: np.ndarray, supervise: str = "own", train: bool = True,
                 seed: int = 0, own_channel_only: bool = False, share_radius: float = 0.0):
        if aug_cfg.flip_prob > 0:
            raise ValueError("refinement patches are never flipped (a flip changes which "
                             "landmark a patch shows); set augment.flip_prob=0")
        if supervise not in ("own", "visible"):
            raise ValueError(f"refine.supervise: {supervise!r} is not own | visible")
        self.dataset = dataset
        self.size, self.grid = int(patch_size), int(grid)
        self.heatmap_cfg, self.supervise, self.train = heatmap_cfg, supervise, train
        self.own_channel_only = own_channel_only
        self.share_radius = float(share_radius)
        # The jitter is the translation: the affine only rotates / scales / shears the patch.
        self.augment = dataclasses.replace(aug_cfg, translate=0.0)
        self.jitter_px = np.asarray(jitter_px, dtype=np.float64)
        k = dataset.num_landmarks
        if self.jitter_px.shape != (len(dataset), k, 2):
            raise ValueError(f"jitter_px must be (N, K, 2) = {(len(dataset), k, 2)}, got "
                             f"{self.jitter_px.shape}")
        # One item per labelled (image, landmark); missing landmarks have no patch.
        self.items = [(i, j) for i, r in enumerate(dataset.records)
                      for j in range(k) if np.isfinite(r.landmarks[j]).all()]
        if not self.items:
            raise ValueError(f"{dataset.name}: no labelled landmark to cut a patch around")
        self.seed = int(seed)
        # image index -> (sample, image on the patch grid, its map to original pixels)
        self._cache: dict[int, tuple[LandmarkSample, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _sample(self, image_index: int) -> tuple[LandmarkSample, np.ndarray, np.ndarray]:
        if image_index not in self._cache:
            sample = self.dataset[image_index]
            image, to_original = on_patch_grid(sample.image, stored_to_original(sample),
                                               sample.original_size, self.grid)
            self._cache[image_index] = (sample, image, to_original)
        return self._cache[image_index]

    def __getitem__(self, index: int) -> dict:
        return self.item(int(index), self.item_rng(index) if self.train else None)

    def item(self, index: int, rng: Optional[np.random.Generator]) -> dict:
        """Item `index` with the randomness of `rng` (None: no jitter, no augmentation)."""
        image_index, landmark = self.items[index]
        sample, grid_image, grid_to_original = self._sample(image_index)
        pixel = patch_pixel(sample.original_size, self.grid)
        centre = sample.landmarks[landmark].copy()
        matrix = None
        if rng is not None:
            centre += rng.normal(size=2) * self.jitter_px[image_index, landmark]
            if self.share_radius > 0:
                # A shared patch at inference shows its landmark up to share_radius patch px
                # from the centre: train on that (uniform over the disc).
                angle = rng.uniform(0, 2 * np.pi)
                radius = self.share_radius * np.sqrt(rng.uniform())
                centre += pixel * radius * np.array([np.cos(angle), np.sin(angle)])
            matrix = random_affine_matrix(rng, self.augment, self.size)
        to_patch = patch_matrix(centre, pixel, self.size)
        if matrix is not None:
            to_patch = matrix @ to_patch
        image = cut_patch(grid_image, grid_to_original, to_patch, self.size)
        if rng is not None:
            image = random_intensity(image, rng, self.augment)
        points = apply_matrix(to_patch, sample.landmarks)
        heatmaps, mask = make_targets(points, (self.size, self.size), self.heatmap_cfg)
        if self.supervise == "own":
            mask = mask & (np.arange(len(mask)) == landmark)
        if self.own_channel_only:
            keep = slice(landmark, landmark + 1)
            heatmaps, mask, points = heatmaps[keep], mask[keep], points[keep]
        return {
            "image": torch.from_numpy(image.astype(np.float32) * 2.0 - 1.0).unsqueeze(0),
            "heatmaps": torch.from_numpy(heatmaps),
            "mask": torch.from_numpy(mask),
            "landmarks": torch.from_numpy(points.astype(np.float32)),
            "to_original": torch.from_numpy(np.linalg.inv(to_patch)),
            "index": int(index),
            "landmark": int(landmark),
        }


def random_crop_matrix(rng: np.random.Generator, image_wh: Sequence[int], grid: int,
                       size: int) -> np.ndarray:
    """Image pixels -> a size x size crop at `grid` pixels across the image's long side,
    centred on a uniformly drawn point of the image (DDPM pretraining on patches)."""
    w, h = image_wh
    centre = (rng.uniform(-0.5, w - 0.5), rng.uniform(-0.5, h - 0.5))
    return patch_matrix(centre, patch_pixel((w, h), grid), size)
