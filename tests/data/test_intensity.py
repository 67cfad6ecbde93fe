"""Intensity augmentation: shape, dtype and range kept, seeded, and landmarks untouched."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddpm_landmarks.config.common import AugmentConfig, DataConfig
from ddpm_landmarks.data import intensity as ops
from ddpm_landmarks.data.sample import LandmarkSample
from ddpm_landmarks.data.transforms import LandmarkTransform


def xray_like(seed: int = 0, shape=(64, 80)) -> np.ndarray:
    """Smooth gradient + texture, with exact 0 and 1 pixels to probe the clipping."""
    rng = np.random.default_rng(seed)
    ys, xs = np.indices(shape)
    image = 0.2 + 0.6 * xs / shape[1] + 0.1 * rng.standard_normal(shape)
    image[:4, :4], image[-4:, -4:] = 0.0, 1.0
    return np.clip(image, 0, 1).astype(np.float32)


STRONG = {
    "brightness": lambda im, rng: ops.adjust_brightness(im, rng, 0.5),
    "contrast": lambda im, rng: ops.adjust_contrast(im, rng, 0.8),
    "gamma": lambda im, rng: ops.adjust_gamma(im, rng, (0.3, 3.0)),
    "clahe": lambda im, rng: ops.apply_clahe(im, rng, 1.0),
    "noise": lambda im, rng: ops.add_gaussian_noise(im, rng, 0.3),
    "blur": lambda im, rng: ops.gaussian_blur(im, rng, 1.0, (0.5, 3.0)),
    "all": lambda im, rng: ops.random_intensity(im, rng, AugmentConfig(
        brightness=0.4, contrast=0.5, gamma=(0.5, 2.0), clahe_prob=0.5, noise_std=0.1,
        blur_prob=0.5, blur_sigma=(0.3, 2.0))),
    "default": lambda im, rng: ops.random_intensity(im, rng, AugmentConfig()),
}


@pytest.mark.parametrize("name", list(STRONG))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shape_dtype_range_and_seeded(name, seed):
    image = xray_like(seed)
    before = image.copy()
    out = STRONG[name](image, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and np.isfinite(out).all()
    np.testing.assert_array_equal(image, before)          # input not modified in place
    again = STRONG[name](image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, again)             # same seed, same result
    assert not np.array_equal(out, image)                 # and it did something


def test_neutral_settings_are_identity():
    image = xray_like()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(ops.adjust_brightness(image, rng, 0.0), image)
    np.testing.assert_allclose(ops.adjust_contrast(image, rng, 0.0), image, atol=1e-6)
    np.testing.assert_allclose(ops.adjust_gamma(image, rng, (1.0, 1.0)), image, atol=1e-6)
    np.testing.assert_array_equal(ops.apply_clahe(image, rng, 0.0), image)
    np.testing.assert_array_equal(ops.add_gaussian_noise(image, rng, 0.0), image)
    np.testing.assert_array_equal(ops.gaussian_blur(image, rng, 0.0, (0.5, 1.0)), image)


def test_contrast_is_about_the_mean():
    image = (0.4 + 0.2 * np.random.default_rng(0).random((32, 32))).astype(np.float32)
    out = ops.adjust_contrast(image, np.random.default_rng(1), 0.5)
    assert out.mean() == pytest.approx(image.mean(), abs=1e-5)
    assert out.std() != pytest.approx(image.std(), rel=1e-3)


def test_brightness_is_one_offset():
    image = np.full((16, 16), 0.5, np.float32)
    out = ops.adjust_brightness(image, np.random.default_rng(3), 0.2)
    assert np.ptp(out) == 0 and abs(out[0, 0] - 0.5) <= 0.2


def test_clahe_raises_local_contrast():
    image = (0.45 + 0.05 * xray_like(1)).astype(np.float32)    # a dull, low-contrast image
    out = ops.apply_clahe(image, np.random.default_rng(0), 1.0)
    assert out.std() > 2 * image.std()


def test_intensity_does_not_move_landmarks():
    """Same seed, with and without intensity: identical geometry (intensity draws come last)."""
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(10, 90, size=(5, 2))
    sample = LandmarkSample("s", xray_like(0, (100, 120)), landmarks, None, (120, 100))
    geometric = AugmentConfig(brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise_std=0.0)
    with_intensity = dataclasses.replace(geometric, brightness=0.3, contrast=0.3,
                                         gamma=(0.7, 1.4), noise_std=0.05, clahe_prob=1.0,
                                         blur_prob=1.0)
    data = DataConfig(image_size=64)
    a = LandmarkTransform(data, geometric, train=True)(sample, np.random.default_rng(5))
    b = LandmarkTransform(data, with_intensity, train=True)(sample, np.random.default_rng(5))
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    np.testing.assert_array_equal(a.to_original, b.to_original)
    assert not np.allclose(a.image, b.image)
    assert b.image.dtype == np.float32 and 0.0 <= b.image.min() and b.image.max() <= 1.0


def test_model_input_fixed_and_minmax_by_hand():
    image = np.array([[0.2, 0.4], [0.6, 0.3]], np.float32)
    assert np.allclose(ops.to_model_input(image, "fixed"), [[-0.6, -0.2], [0.2, -0.4]])
    # min-max: (x - 0.2) / 0.4, then to [-1, 1]
    assert np.allclose(ops.to_model_input(image, "minmax"), [[-1.0, 0.0], [1.0, -0.5]], atol=1e-6)
    assert np.array_equal(ops.to_model_input(np.full((2, 2), 0.7, np.float32), "minmax"),
                          np.full((2, 2), -1.0, np.float32))       # constant: 0, not NaN
    with pytest.raises(ValueError, match="unknown intensity_norm 'zscore'"):
        ops.to_model_input(image, "zscore")


def test_heatmap_dataset_minmax_spans_the_whole_range(tmp_path):
    import cv2

    from ddpm_landmarks.config.common import HeatmapConfig
    from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
    from ddpm_landmarks.data.sample import LandmarkDataset, Record
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.repeat(np.array([60, 180], np.uint8), [15, 15])[:, None]
                .repeat(40, axis=1))                       # top half 60, bottom half 180
    ds = LandmarkDataset("t", [Record("a", path, np.array([[10.0, 12.0]]))], 1)
    for norm, lo, hi in (("fixed", 60 / 255 * 2 - 1, 180 / 255 * 2 - 1), ("minmax", -1, 1)):
        data = DataConfig(image_size=32, intensity_norm=norm)
        item = HeatmapDataset(ds, data, AugmentConfig(), HeatmapConfig(), train=False)[0]
        assert item["image"].min().item() == pytest.approx(lo, abs=0.02)
        assert item["image"].max().item() == pytest.approx(hi, abs=0.02)
