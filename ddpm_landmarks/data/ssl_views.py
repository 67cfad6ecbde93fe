"""Two augmented views of one unlabelled x-ray (plus DINO's small crops), for the SSL baselines.

    dataset = TwoViewImages(pools, image_size=64, views=cfg.ssl.views, seed=0)
    item = dataset[i]          # {"view1": (1, G, G), "view2": (1, G, G)} float32 in [-1, 1]
                               # + "local": (n, 1, s, s) with views.local_crops = n > 0

G = views.global_size (default: the S x S model grid); DINO's multi-crop adds n local views of
views.local_size pixels, cropped from views.local_crop_scale of the grid, each augmented like
a view.

Each view is drawn independently from the same image (SimCLR's and MoCo's recipe, adapted to
gray x-rays):

1. geometry, as ONE 3x3 matrix on the original pixels (data/transforms.py conventions): the
   deterministic resize to the S x S model grid (data.resize_mode), a random resized crop of
   that grid (area fraction in `crop_scale`, aspect in `crop_ratio`, torchvision's
   RandomResizedCrop sampling), a rotation about the centre, an optional horizontal flip
   (`flip_prob`, default 0: anatomy has a side). One warp per view from the full-resolution
   image (area-antialiased once for both views), so a small crop keeps the original detail;
2. intensity, with probability `jitter_prob`: gamma, contrast, brightness (the gray part of
   SimCLR's colour jitter; no hue, saturation or grayscale op: x-rays have one channel);
3. Gaussian blur with probability `blur_prob`, sigma in `blur_sigma` (model-grid pixels);
4. Gaussian noise of std `noise_std`.

Randomness: per item, as PretrainImages (data/randomness.py; formerly reseeded per DataLoader
worker and epoch), so augmentations differ per process and are not replayed after a resume.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.data.intensity import (
    add_gaussian_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    gaussian_blur,
    to_model_input,
)
from ddpm_landmarks.data.pretrain_data import PretrainImages
from ddpm_landmarks.data.transforms import (
    flip_matrix,
    original_to_model_matrix,
    resize_matrix,
    scale_matrix,
    translation_matrix,
    warp_image,
)
from ddpm_landmarks.data.unlabeled import MixedPools
from ddpm_landmarks.errors import ConfigError


def random_resized_crop_box(rng: np.random.Generator, size: int, scale: Sequence[float],
                            ratio: Sequence[float], attempts: int = 10
                            ) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of a crop of the size x size grid, in pixel-edge units ([0, size]).

    torchvision's RandomResizedCrop sampling, in floats: area fraction uniform in `scale`,
    log-aspect uniform in log(`ratio`), position uniform; after `attempts` misses (a crop
    larger than the grid) the whole grid.
    """
    area = float(size) ** 2
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= size and 0 < h <= size:
            return float(rng.uniform(0.0, size - w)), float(rng.uniform(0.0, size - h)), w, h
    return 0.0, 0.0, float(size), float(size)


def crop_matrix(box: Sequence[float], size: int) -> np.ndarray:
    """Model grid -> view grid: the crop `box` (x0, y0, w, h; pixel edges of the model grid)
    stretched onto a whole size x size grid, pixel-centre convention:
    u = (x + 0.5 - x0) * size / w - 0.5."""
    x0, y0, w, h = (float(v) for v in box)
    return (translation_matrix(-0.5, -0.5) @ scale_matrix(size / w, size / h)
            @ translation_matrix(0.5 - x0, 0.5 - y0))


def rotation_matrix(angle_deg: float, size: int) -> np.ndarray:
    """Rotation by angle_deg about the centre of the size x size pixel-centre grid."""
    c = (size - 1) / 2.0
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0],
                    [0.0, 0.0, 1.0]])
    return translation_matrix(c, c) @ rot @ translation_matrix(-c, -c)


def random_view_matrix(rng: np.random.Generator, views, size: int,
                       out_size: Optional[int] = None,
                       crop_scale: Optional[Sequence[float]] = None) -> np.ndarray:
    """Model grid (size) -> augmented view grid (out_size, default size): crop (area fraction
    in crop_scale, default views.crop_scale), then flip (prob.), then rotation.

    Draw order is fixed (crop, flip, angle) and the flip and angle are always drawn."""
    out = size if out_size is None else int(out_size)
    scale = views.crop_scale if crop_scale is None else crop_scale
    box = random_resized_crop_box(rng, size, scale, views.crop_ratio)
    flip = rng.random() < views.flip_prob
    angle = rng.uniform(-views.rotation_deg, views.rotation_deg)
    matrix = crop_matrix(box, out)
    if flip:
        matrix = flip_matrix(out) @ matrix
    return rotation_matrix(angle, out) @ matrix


def random_view_intensity(image: np.ndarray, rng: np.random.Generator, views) -> np.ndarray:
    """Jitter (gamma, contrast, brightness; together with prob. jitter_prob), blur, noise."""
    out = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
    if rng.random() < views.jitter_prob:
        out = adjust_gamma(out, rng, views.gamma)
        out = adjust_contrast(out, rng, views.contrast)
        out = adjust_brightness(out, rng, views.brightness)
    out = gaussian_blur(out, rng, views.blur_prob, views.blur_sigma)
    out = add_gaussian_noise(out, rng, views.noise_std)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def max_zoom(views, size: Optional[int] = None) -> float:
    """Largest magnification a crop of the size x size grid can apply (the smallest crop side
    is sqrt(scale * ratio) of the grid, stretched onto its view's side), used to pick the
    resolution every view is warped from."""
    smallest = min(views.crop_ratio[0], 1.0 / views.crop_ratio[1], 1.0)
    crops = [(views.crop_scale, 1.0)]
    if size is not None:
        crops = [(views.crop_scale, (views.global_size or size) / size)]
        if views.local_crops:
            crops.append((views.local_crop_scale, views.local_size / size))
    return max(stretch / math.sqrt(max(scale[0] * smallest, 1e-6)) for scale, stretch in crops)


def check_views(views) -> None:
    """ConfigError for ranges that cannot be sampled."""
    s0, s1 = views.crop_scale
    r0, r1 = views.crop_ratio
    if not 0 < s0 <= s1 <= 1:
        raise ConfigError(f"ssl.views.crop_scale={list(views.crop_scale)}: need 0 < lo <= hi <= 1")
    if not 0 < r0 <= r1:
        raise ConfigError(f"ssl.views.crop_ratio={list(views.crop_ratio)}: need 0 < lo <= hi")
    for name in ("flip_prob", "jitter_prob", "blur_prob"):
        if not 0 <= getattr(views, name) <= 1:
            raise ConfigError(f"ssl.views.{name}={getattr(views, name)}: not a probability")
    l0, l1 = views.local_crop_scale
    if views.local_crops < 0 or (views.local_crops and (views.local_size < 1
                                                         or not 0 < l0 <= l1 <= 1)):
        raise ConfigError(f"ssl.views: local_crops={views.local_crops}, local_size="
                          f"{views.local_size}, local_crop_scale={list(views.local_crop_scale)}: "
                          f"need a count >= 0, a positive size and 0 < lo <= hi <= 1")
    if views.global_size is not None and views.global_size < 1:
        raise ConfigError(f"ssl.views.global_size={views.global_size}: must be positive")


class TwoViewImages(PretrainImages):
    """MixedPools -> {"view1", "view2"[, "local"]}: independent augmentations of one image,
    float32 in [-1, 1] (module doc). Same pools, exclusions, per-item randomness and audit files
    as the DDPM images (PretrainImages)."""

    def __init__(self, pools: MixedPools, image_size: int, views, resize_mode: str = "stretch",
                 seed: int = 0, intensity_norm: str = "fixed"):
        super().__init__(pools, image_size, resize_mode, augment=None, seed=seed,
                         intensity_norm=intensity_norm)
        check_views(views)
        self.views = views

    def _base(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, original -> model-grid matrix), the image area-reduced once to the finest
        resolution any crop needs (both views are warped from it)."""
        image = read_image(self.pools.path(index))
        h, w = image.shape
        matrix = original_to_model_matrix((w, h), self.size, self.resize_mode)
        shrink = np.linalg.norm(matrix[:2, :2], axis=0) * max_zoom(self.views, self.size)
        if (shrink < 0.5).any():
            wh = (w, h)
            target = tuple(max(1, min(n, math.ceil(n * f))) for n, f in zip(wh, shrink))
            image = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
            matrix = matrix @ np.linalg.inv(resize_matrix(wh, target, "stretch"))
        return image, matrix

    def view(self, image: np.ndarray, matrix: np.ndarray, rng: np.random.Generator,
             local: bool = False) -> np.ndarray:
        """One augmented view, float32 (G, G) in [0, 1]; local=True: a small crop (s, s)."""
        v = self.views
        out = v.local_size if local else (v.global_size or self.size)
        view = random_view_matrix(rng, v, self.size, out, v.local_crop_scale if local else None)
        return random_view_intensity(warp_image(image, view @ matrix, out), rng, v)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, matrix = self._base(int(index))
        rng = self.item_rng(index)
        one, two = self.view(image, matrix, rng), self.view(image, matrix, rng)
        item = {"view1": self.as_tensor(one), "view2": self.as_tensor(two)}
        if self.views.local_crops:
            item["local"] = torch.stack([self.as_tensor(self.view(image, matrix, rng, local=True))
                                         for _ in range(self.views.local_crops)])
        return item

    def as_tensor(self, view: np.ndarray) -> torch.Tensor:
        """(S, S) [0, 1] view -> (1, S, S) network input in [-1, 1] (data.intensity_norm)."""
        return torch.from_numpy(to_model_input(view, self.intensity_norm)).unsqueeze(0)
