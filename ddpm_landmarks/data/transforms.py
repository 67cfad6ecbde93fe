"""Putting a sample on the model grid: resize + geometric augmentation as 3x3 matrices.

Every geometric step is a 3x3 matrix acting on homogeneous (x, y, 1) points in the pixel-centre
convention (integer coordinate = pixel centre, an image of width W spans [-0.5, W-0.5]; the
convention of cv2.resize and cv2.warpAffine). The steps are composed into ONE matrix and that
same matrix moves the image (cv2.warpAffine) and the landmarks, so they cannot drift apart:

    original pixels --O2S--> stored grid --(resize, flip, random affine)--> model grid

`to_original` is the exact inverse (np.linalg.inv of the 3x3), used to bring predictions back
to original pixels where errors in mm are measured.

Flip convention: `flip_permutation[i]` is the label that old landmark i carries after a
horizontal flip, i.e. new[perm[i]] = old[i] (see flip_landmark_labels). For the usual
left/right swap permutations perm is its own inverse and the two readings coincide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from ddpm_landmarks.config.common import AugmentConfig, DataConfig
from ddpm_landmarks.data.intensity import random_intensity
from ddpm_landmarks.data.sample import LandmarkSample

# warpAffine's bilinear interpolation reads only 2x2 source pixels per output pixel, so a
# shrink below 1/2 skips source pixels and aliases; below this factor we area-average first.
ANTIALIAS_BELOW = 0.5


# ----------------------------------------------------------------------------------------------
# Matrices
# ----------------------------------------------------------------------------------------------

def translation_matrix(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scale_matrix(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def resize_matrix(src_wh: Sequence[float], dst_wh: Sequence[float],
                  mode: str = "stretch") -> np.ndarray:
    """Grid of size src_wh -> grid of size dst_wh, pixel-centre convention.

    stretch:   x' = (x + 0.5) * (W'/W) - 0.5, independently per axis (anisotropic, the paper).
    letterbox: one scale s = min(W'/W, H'/H) for both axes, content centred with the
               (possibly fractional) padding split equally on both sides.
    """
    sw, sh = float(src_wh[0]), float(src_wh[1])
    dw, dh = float(dst_wh[0]), float(dst_wh[1])
    if min(sw, sh, dw, dh) <= 0:
        raise ValueError(f"resize_matrix: sizes must be positive, got {src_wh} -> {dst_wh}")
    if mode == "stretch":
        sx, sy, px, py = dw / sw, dh / sh, 0.0, 0.0
    elif mode == "letterbox":
        sx = sy = min(dw / sw, dh / sh)
        px, py = (dw - sw * sx) / 2.0, (dh - sh * sy) / 2.0
    else:
        raise ValueError(f"resize_matrix: unknown mode {mode!r} (stretch | letterbox)")
    # shift so pixel edges (not centres) scale about 0, then shift back and pad
    return translation_matrix(px - 0.5, py - 0.5) @ scale_matrix(sx, sy) @ translation_matrix(0.5, 0.5)


def original_to_stored_matrix(original_wh: Sequence[int], stored_wh: Sequence[int]) -> np.ndarray:
    """Same mapping as sample.original_to_stored (x_s = (x_o + 0.5) * s - 0.5), as a matrix."""
    return resize_matrix(original_wh, stored_wh, "stretch")


def original_to_model_matrix(original_wh: Sequence[int], size: int, mode: str) -> np.ndarray:
    """Deterministic resize original pixels -> size x size model grid.

    Letterbox keeps the aspect of the ORIGINAL grid (the stored one is rounded, e.g. 2400x1935
    stored as 512x413), so the scale is isotropic in original pixels. For stretch it makes no
    difference: stretching the stored grid is exactly the same map.
    """
    return resize_matrix(original_wh, (size, size), mode)


def flip_matrix(width: int) -> np.ndarray:
    """Horizontal flip of a grid of `width` pixels: x' = (W - 1) - x."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def random_affine_matrix(rng: np.random.Generator, cfg: AugmentConfig, size: int) -> np.ndarray:
    """Random rotation, isotropic scale, shear and translation about the grid centre.

    Draw order is fixed (rotation, scale, shear, tx, ty) and every value is always drawn, so a
    seed gives the same augmentation whatever the ranges are. With cfg.affine_prob < 1 one more
    draw decides whether the affine applies at all (identity otherwise).
    """
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    scale = rng.uniform(cfg.scale[0], cfg.scale[1])
    shear = np.deg2rad(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
    tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * size
    if cfg.affine_prob < 1 and not rng.random() < cfg.affine_prob:
        return np.eye(3)
    c = (size - 1) / 2.0                    # centre of the pixel-centre grid
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    shearing = np.array([[1.0, np.tan(shear), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return (translation_matrix(c + tx, c + ty) @ rotation @ shearing
            @ scale_matrix(scale, scale) @ translation_matrix(-c, -c))


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine matrix to (..., 2) points; float64; a NaN point stays NaN."""
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def map_to_original(points_model: np.ndarray, to_original: np.ndarray) -> np.ndarray:
    """Model-grid points (..., 2) -> original pixels (float64, NaN preserved).

    Only coordinates are mapped: if the sample was flipped, labels are still in flipped order.
    """
    return apply_matrix(to_original, points_model)


def visible_mask(points: np.ndarray, size: int) -> np.ndarray:
    """True where a point is present and inside the grid [-0.5, size - 0.5] on both axes."""
    points = np.asarray(points, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside = (points >= -0.5) & (points <= size - 0.5)
    return inside.all(axis=-1)


def flip_landmark_labels(points: np.ndarray, permutation: Sequence[int]) -> np.ndarray:
    """Relabel after a flip: the point that was landmark i becomes landmark perm[i]."""
    perm = np.asarray(permutation, dtype=np.int64)
    if perm.shape != (len(points),) or sorted(perm.tolist()) != list(range(len(points))):
        raise ValueError(f"flip permutation {perm.tolist()} is not a permutation of "
                         f"0..{len(points) - 1}")
    out = np.empty_like(points)
    out[perm] = points
    return out


# ----------------------------------------------------------------------------------------------
# Image warping
# ----------------------------------------------------------------------------------------------

def antialias_plan(image_wh: Sequence[int], matrix: np.ndarray) -> Optional[tuple[int, int]]:
    """Intermediate (w, h) to area-resize to before warping, or None if no pre-resize is needed.

    The shrink along each source axis is the length of the image of that axis' unit vector
    under the matrix (rotation-invariant). Axes shrunk by less than ANTIALIAS_BELOW are
    area-resized to about the final resolution; the remaining warp is then close to 1:1.
    """
    shrink = np.linalg.norm(np.asarray(matrix, dtype=np.float64)[:2, :2], axis=0)
    if (shrink >= ANTIALIAS_BELOW).all():
        return None
    factors = np.where(shrink < ANTIALIAS_BELOW, shrink, 1.0)
    w, h = (max(1, int(round(n * f))) for n, f in zip(image_wh, factors))
    return w, h


BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int],
               border: str = "constant") -> np.ndarray:
    """Warp a float32 (H, W) image onto a size x size (or (w, h)) grid; `matrix` maps image
    grid -> output grid; outside the image is 0 (border "constant") or the nearest edge pixel
    ("replicate").

    Large shrinks are area-resized first (cv2.resize INTER_AREA); that resize's exact matrix is
    folded out of the warp so the overall geometry is still exactly `matrix`.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    matrix = np.asarray(matrix, dtype=np.float64)
    h, w = image.shape[:2]
    plan = antialias_plan((w, h), matrix)
    if plan is not None:
        image = cv2.resize(image, plan, interpolation=cv2.INTER_AREA)
        matrix = matrix @ np.linalg.inv(resize_matrix((w, h), plan, "stretch"))
    # Hand OpenCV the inverse we computed in float64 rather than letting it invert in place.
    inverse = np.linalg.inv(matrix)[:2]
    dsize = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    return cv2.warpAffine(image, inverse, dsize,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=BORDERS[border], borderValue=0.0)


# ----------------------------------------------------------------------------------------------
# The per-sample transform
# ----------------------------------------------------------------------------------------------

@dataclass
class TransformedSample:
    id: str
    image: np.ndarray          # float32 (S, S) on the model grid
    landmarks: np.ndarray      # float64 (K, 2) model grid; NaN = missing; may lie off the grid
    visible: np.ndarray        # bool (K,): present and inside [-0.5, S - 0.5]
    to_original: np.ndarray    # 3x3: model grid -> original pixels
    flipped: bool              # labels were permuted with the flip permutation


class LandmarkTransform:
    """LandmarkSample -> TransformedSample on the size x size model grid.

    train=False: only the deterministic resize. train=True: resize, then (with flip_prob) a
    horizontal flip, then a random affine about the grid centre, then intensity augmentation.
    """

    def __init__(self, data_cfg: DataConfig, aug_cfg: AugmentConfig,
                 flip_permutation: Optional[Sequence[int]] = None, train: bool = False,
                 dataset_name: Optional[str] = None):
        self.size = int(data_cfg.image_size)
        self.mode = data_cfg.resize_mode
        self.aug = aug_cfg
        self.train = train
        name = dataset_name or data_cfg.dataset
        # Refused even for train=False: the config is wrong either way, so say it early.
        if aug_cfg.flip_prob > 0 and flip_permutation is None:
            raise ValueError(
                f"dataset '{name}': augment.flip_prob={aug_cfg.flip_prob} but the dataset has no "
                "left/right landmark permutation; a flipped image would carry swapped labels. "
                "Set augment.flip_prob=0 or give the dataset a flip_permutation.")
        self.flip_permutation = None if flip_permutation is None else list(flip_permutation)

    def geometry(self, sample: LandmarkSample,
                 rng: Optional[np.random.Generator]) -> tuple[np.ndarray, bool]:
        """(original -> model matrix, flipped) for this sample; draws from rng when training."""
        matrix = original_to_model_matrix(sample.original_size, self.size, self.mode)
        flipped = False
        if self.train:
            if rng is None:
                raise ValueError("LandmarkTransform(train=True) needs an rng")
            flipped = bool(rng.random() < self.aug.flip_prob)
            if flipped:
                matrix = flip_matrix(self.size) @ matrix
            matrix = random_affine_matrix(rng, self.aug, self.size) @ matrix
        return matrix, flipped

    def __call__(self, sample: LandmarkSample,
                 rng: Optional[np.random.Generator] = None) -> TransformedSample:
        if sample.image.ndim != 2:
            raise ValueError(f"{sample.id}: expected a 2-D gray image, got {sample.image.shape}")
        original_to_model, flipped = self.geometry(sample, rng)
        stored_wh = (sample.image.shape[1], sample.image.shape[0])
        stored_to_model = original_to_model @ np.linalg.inv(
            original_to_stored_matrix(sample.original_size, stored_wh))
        image = warp_image(sample.image, stored_to_model, self.size,
                           self.aug.border if self.train else "constant")
        landmarks = apply_matrix(original_to_model, sample.landmarks)
        if flipped:
            landmarks = flip_landmark_labels(landmarks, self.flip_permutation)
        if self.train:
            image = random_intensity(image, rng, self.aug)
        return TransformedSample(id=sample.id, image=image.astype(np.float32, copy=False),
                                 landmarks=landmarks, visible=visible_mask(landmarks, self.size),
                                 to_original=np.linalg.inv(original_to_model), flipped=flipped)
