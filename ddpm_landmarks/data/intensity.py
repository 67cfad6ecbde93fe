"""Intensity augmentation for gray x-rays: float32 (H, W) in [0, 1] in, same out.

Pure functions: each takes the image and an np.random.Generator, returns a new array, and
never touches geometry (landmarks do not move). Every random value is drawn even when the op
turns out to be a no-op, so a seed always consumes the stream the same way. Each op clips to
[0, 1] so they can be used alone. No colour operations: x-rays have one channel.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ddpm_landmarks.config.common import AugmentConfig


def _unit(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def adjust_brightness(image: np.ndarray, rng: np.random.Generator, limit: float) -> np.ndarray:
    """Add one offset uniform in [-limit, limit]."""
    return _unit(image + np.float32(rng.uniform(-limit, limit)))


def adjust_contrast(image: np.ndarray, rng: np.random.Generator, limit: float) -> np.ndarray:
    """Scale deviations from the image mean by a factor uniform in [1 - limit, 1 + limit]."""
    factor = np.float32(rng.uniform(1.0 - limit, 1.0 + limit))
    mean = np.float32(image.mean())
    return _unit(mean + (image - mean) * factor)


def adjust_gamma(image: np.ndarray, rng: np.random.Generator,
                 gamma_range: Sequence[float]) -> np.ndarray:
    """image ** gamma with gamma uniform in gamma_range (keeps 0 and 1 fixed)."""
    gamma = np.float32(rng.uniform(gamma_range[0], gamma_range[1]))
    return _unit(np.power(_unit(image), gamma))


def apply_clahe(image: np.ndarray, rng: np.random.Generator, prob: float,
                clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    """With probability `prob`, CLAHE on an 8-bit view of the image (OpenCV's CLAHE wants uint8
    or uint16; 8 bits is what the x-ray literature augments with)."""
    if not rng.random() < prob:
        return _unit(image)
    u8 = np.round(_unit(image) * 255.0).astype(np.uint8)
    out = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tile_grid).apply(u8)
    return out.astype(np.float32) / np.float32(255.0)


def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Add i.i.d. N(0, std^2) noise per pixel."""
    if std <= 0:
        return _unit(image)
    noise = rng.normal(0.0, std, size=image.shape).astype(np.float32)
    return _unit(image + noise)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, prob: float,
                  sigma_range: Sequence[float]) -> np.ndarray:
    """With probability `prob`, Gaussian blur with sigma uniform in sigma_range (pixels)."""
    apply = rng.random() < prob
    sigma = rng.uniform(sigma_range[0], sigma_range[1])
    if not apply or sigma <= 0:
        return _unit(image)
    # ksize (0, 0): OpenCV picks the kernel size from sigma (about 6 sigma + 1 for float images)
    return _unit(cv2.GaussianBlur(np.ascontiguousarray(image, dtype=np.float32), (0, 0),
                                  sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101))


def random_intensity(image: np.ndarray, rng: np.random.Generator,
                     cfg: AugmentConfig) -> np.ndarray:
    """All intensity ops in a fixed order; float32 (H, W) in [0, 1] out.

    CLAHE first (it is a contrast *normalisation*, meant for the unaltered image), then the
    global tone changes, blur, and noise last (noise should not be blurred or re-toned).
    """
    out = _unit(np.asarray(image, dtype=np.float32))
    out = apply_clahe(out, rng, cfg.clahe_prob)
    out = adjust_gamma(out, rng, cfg.gamma)
    out = adjust_contrast(out, rng, cfg.contrast)
    out = adjust_brightness(out, rng, cfg.brightness)
    out = gaussian_blur(out, rng, cfg.blur_prob, cfg.blur_sigma)
    out = add_gaussian_noise(out, rng, cfg.noise_std)
    return _unit(out)


# Gray levels -> network input. Every model of the package takes [-1, 1]; what differs is how
# the [0, 1] image is obtained (DataConfig.intensity_norm):
#   fixed:  the file's container range (8 bit / 255, 16 bit / 65535; data/image_io.py), the
#           same for every image, so contrast differences between images are kept (ours);
#   minmax: per-image min-max stretch of the model-grid image to [0, 1], after resize and
#           augmentation: the released code's albumentations Normalize(normalization="min_max")
#           (global min and max of the image; a constant image becomes 0, where albumentations
#           would divide by zero).
INTENSITY_NORMS = ("fixed", "minmax")


def to_model_input(image: np.ndarray, norm: str = "fixed") -> np.ndarray:
    """float32 (H, W) model-grid image in [0, 1] -> float32 network input in [-1, 1]."""
    out = np.asarray(image, dtype=np.float32)
    if norm == "minmax":
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    elif norm != "fixed":
        raise ValueError(f"unknown intensity_norm {norm!r}; valid: {', '.join(INTENSITY_NORMS)}")
    return (out * 2.0 - 1.0).astype(np.float32, copy=False)
