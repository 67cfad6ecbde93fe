"""Synthetic x-ray-like landmark data: the built-in default dataset and the test fixture.

Each image is a dark background with a soft-tissue ellipse, a bright "bone" whose outline passes
through the landmarks, a denser inner cortex, small bony processes at each landmark, film-grain
noise and blur. Landmarks follow a point distribution model: a left/right symmetric mean shape,
two smooth deformation modes with Gaussian coefficients, and a random similarity transform. The
shape distribution is mirror symmetric, so horizontal flips with the pair permutation are valid
augmentations (the test of the flip machinery on a real-looking case).

The set is written in the generic layout (images/, landmarks.csv, manifest.csv) and read back
through the same reader as real data, so the synthetic path exercises the real code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ddpm_landmarks.utils.paths import expand_path

SPACING_MM = 0.5          # stated pixel spacing of the synthetic images (isotropic)
FORMAT_VERSION = 1        # bump when the generator changes, so caches are regenerated


@dataclass(frozen=True)
class SyntheticSpec:
    num_images: int = 120
    image_size: int = 256
    num_landmarks: int = 8            # even: landmarks come in left/right pairs
    seed: int = 0
    test_fraction: float = 1 / 3      # last images form the 'test1' split

    def key(self) -> str:
        text = json.dumps({**self.__dict__, "v": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


def flip_permutation(num_landmarks: int) -> list[int]:
    """Landmarks 2i and 2i+1 are mirror images of each other."""
    return [i + 1 if i % 2 == 0 else i - 1 for i in range(num_landmarks)]


def mean_shape(num_landmarks: int) -> np.ndarray:
    """Symmetric outline in unit coordinates (centre 0,0): pairs (left, right) top to bottom."""
    if num_landmarks < 2 or num_landmarks % 2:
        raise ValueError(f"synthetic num_landmarks must be even and >= 2, got {num_landmarks}")
    pairs = num_landmarks // 2
    t = np.linspace(0.0, 1.0, pairs)
    y = -0.55 + 1.1 * t                               # top to bottom
    half_width = 0.18 + 0.22 * np.sin(np.pi * (0.15 + 0.7 * t)) + 0.08 * t
    left = np.stack([-half_width, y], axis=1)
    right = np.stack([half_width, y], axis=1)
    return np.stack([left, right], axis=1).reshape(-1, 2)


def sample_shape(rng: np.random.Generator, num_landmarks: int, size: int) -> np.ndarray:
    """Draw one landmark configuration in pixels of a size x size image."""
    base = mean_shape(num_landmarks)
    # Mode 1: widen / narrow (symmetric). Mode 2: lengthen the lower half (symmetric).
    widen = rng.normal(0.0, 0.08)
    stretch = rng.normal(0.0, 0.08)
    pts = base.copy()
    pts[:, 0] *= 1.0 + widen
    pts[:, 1] += stretch * np.clip(pts[:, 1], 0, None)
    pts += rng.normal(0.0, 0.012, size=pts.shape)    # individual anatomical variation
    angle = np.deg2rad(rng.normal(0.0, 6.0))
    scale = rng.uniform(0.85, 1.05) * size * 0.55
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = size / 2 - 0.5 + rng.normal(0.0, 0.03 * size, size=2)
    return pts @ rot.T * scale + centre


def render_image(rng: np.random.Generator, points: np.ndarray, size: int) -> np.ndarray:
    """Render an x-ray-like float32 image in [0, 1] for the given landmark positions."""
    img = np.full((size, size), 0.05, np.float32)
    # Soft tissue: a broad ellipse with a smooth fall-off.
    centre = points.mean(axis=0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ax, ay = size * rng.uniform(0.36, 0.44), size * rng.uniform(0.44, 0.5)
    r2 = ((xx - centre[0]) / ax) ** 2 + ((yy - centre[1]) / ay) ** 2
    img += 0.25 * np.clip(1.2 - r2, 0, 1)

    # Bone: outline through the landmarks (left side down, right side up), filled.
    left, right = points[0::2], points[1::2]
    outline = np.concatenate([left, right[::-1]])
    shift = 4  # draw with sub-pixel precision: cv2 fixed-point coordinates
    poly = np.round((outline + 0.0) * (1 << shift)).astype(np.int32)
    bone = np.zeros((size, size), np.float32)
    cv2.fillPoly(bone, [poly], 1.0, lineType=cv2.LINE_AA, shift=shift)
    cortex = np.zeros_like(bone)
    cv2.polylines(cortex, [poly], True, 1.0, thickness=max(2, size // 64), lineType=cv2.LINE_AA,
                  shift=shift)
    # Trabecular texture: a smoothed random field, visible only inside the bone.
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 80)
    texture /= texture.std() + 1e-6
    img += bone * (0.28 + 0.04 * texture) + 0.22 * cortex

    # Bony processes: small dense knobs exactly at the landmarks, sizes varying along the shape
    # so that each landmark pair is locally distinctive.
    knobs = np.zeros_like(bone)
    for k, (x, y) in enumerate(points):
        radius = size * (0.012 + 0.004 * (k // 2 % 3))
        knobs = np.maximum(knobs, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * radius ** 2)))
    img += 0.3 * knobs

    # Acquisition: low-frequency exposure variation, blur, quantum noise.
    gradient = rng.uniform(-0.06, 0.06) * (xx / size - 0.5) + rng.uniform(-0.06, 0.06) * (yy / size - 0.5)
    img += gradient
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.6, 1.2))
    img += rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def generate(out_dir: str | Path, spec: SyntheticSpec) -> Path:
    """Write the dataset in the generic layout; atomic (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    if (out_dir / "manifest.csv").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        rng = np.random.default_rng(spec.seed)
        n_test = int(round(spec.num_images * spec.test_fraction))
        manifest = ["image,spacing_mm,split"]
        rows = ["image,landmark_index,x,y"]
        for i in range(spec.num_images):
            points = sample_shape(rng, spec.num_landmarks, spec.image_size)
            image = render_image(rng, points, spec.image_size)
            name = f"{i:04d}.png"
            cv2.imwrite(str(tmp / "images" / name), np.round(image * 255).astype(np.uint8))
            split = "test1" if i >= spec.num_images - n_test else "train"
            manifest.append(f"{name},{SPACING_MM},{split}")
            rows += [f"{name},{k},{x:.4f},{y:.4f}" for k, (x, y) in enumerate(points)]
        (tmp / "manifest.csv").write_text("\n".join(manifest) + "\n")
        (tmp / "landmarks.csv").write_text("\n".join(rows) + "\n")
        (tmp / "synthetic.json").write_text(json.dumps(
            {**spec.__dict__, "format_version": FORMAT_VERSION, "spacing_mm": SPACING_MM}, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process generated it first (e.g. two accelerate workers): keep theirs.
            if not (out_dir / "manifest.csv").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDPM_LANDMARKS_CACHE", Path.home() / ".cache" / "ddpm_landmarks"))


def spec_from_config(cfg) -> SyntheticSpec:
    return SyntheticSpec(num_images=cfg.synthetic_num_images, image_size=cfg.synthetic_image_size,
                         num_landmarks=cfg.synthetic_num_landmarks, seed=cfg.synthetic_seed)


def build_synthetic_dataset(cfg):
    """The synthetic dataset for a DataConfig, generated on first use into root or the cache."""
    from ddpm_landmarks.data.generic import read_landmark_folder

    spec = spec_from_config(cfg)
    root = expand_path(cfg.root) if cfg.root else \
        default_cache_dir() / f"synthetic_{spec.key()}"
    generate(root, spec)
    k = spec.num_landmarks
    return read_landmark_folder(
        root, name="synthetic", num_landmarks=k, on_bad=cfg.on_bad_sample,
        landmark_names=[f"{'L' if i % 2 == 0 else 'R'}{i // 2}" for i in range(k)],
        flip_permutation=flip_permutation(k), sdr_thresholds_mm=(1.0, 2.0, 4.0))
