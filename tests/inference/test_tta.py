"""Test-time augmentation views are mapped back EXACTLY: a heatmap at a known float position
on each jittered grid returns to that position to < 1e-6 px, and the images are warped with
the matrix the points are mapped back with (pixel-centre convention of data/transforms.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_landmarks.config.common import DecoderConfig, HeatmapConfig, UncertaintyConfig
from ddpm_landmarks.data.transforms import apply_matrix, flip_matrix, translation_matrix
from ddpm_landmarks.heatmaps.decoders import decode
from ddpm_landmarks.heatmaps.targets import make_targets
from ddpm_landmarks.inference.tta import (
    TTAEstimator,
    map_back,
    tta_matrices,
    unflip,
    warp_batch,
)
from ddpm_landmarks.inference.uncertainty import GridEstimates

SIZE = 64
POINTS = np.array([[20.37, 31.81], [43.63, 31.81]])       # a mirror pair about x = 31.5
CFG = UncertaintyConfig(tta_jitters=6, tta_rotation_deg=5.0, tta_scale=(0.9, 1.1),
                        tta_translate=0.05)


def test_jitters_are_seeded_small_and_invertible():
    a, b = tta_matrices(CFG, SIZE), tta_matrices(CFG, SIZE)
    assert len(a) == 6 and all(np.array_equal(x, y) for x, y in zip(a, b))
    other = tta_matrices(UncertaintyConfig(tta_jitters=6, tta_seed=1), SIZE)
    assert not np.allclose(a[0], other[0])
    for m in a:
        moved = apply_matrix(m, POINTS) - POINTS
        assert 0 < np.abs(moved).max() < 0.05 * SIZE + 0.15 * SIZE      # translate + rot/scale


@pytest.mark.parametrize("index", range(6))
def test_heatmap_on_the_jittered_grid_maps_back_exactly(index):
    """What an equivariant model outputs on the jittered image: a Gaussian at T p. Decoded
    (the parabola on logs is exact for a Gaussian) and mapped back with T^-1, it is p."""
    matrix = tta_matrices(CFG, SIZE)[index]
    maps, _ = make_targets(apply_matrix(matrix, POINTS), (SIZE, SIZE), HeatmapConfig(sigma=2.0))
    points, _ = decode(maps, DecoderConfig(name="parabola"))
    np.testing.assert_allclose(map_back(points, matrix), POINTS, rtol=0, atol=1e-6)


def test_mirrored_heatmap_maps_back_with_the_permutation():
    flipped = apply_matrix(flip_matrix(SIZE), POINTS)[[1, 0]]   # landmark 0 is now on the right
    maps, _ = make_targets(flipped, (SIZE, SIZE), HeatmapConfig(sigma=2.0))
    points, _ = decode(maps[None], DecoderConfig(name="parabola"))
    np.testing.assert_allclose(unflip(points, SIZE, [1, 0])[0], POINTS, rtol=0, atol=1e-6)


class BlobFinder:
    """An exactly equivariant 'model': the image itself is the heatmap, its left half for
    landmark 0 and its right half for landmark 1 (a left/right pair)."""

    def estimate(self, images: torch.Tensor) -> GridEstimates:
        g = (images[:, 0].double().numpy() + 1.0) / 2.0
        left = np.arange(SIZE) < SIZE / 2
        maps = np.stack([np.where(left, g, 0.0), np.where(left, 0.0, g)], axis=1)
        points, peak = decode(maps, DecoderConfig(name="parabola"))
        return GridEstimates(points, peak, np.zeros(points.shape + (2,)))


def blob_image() -> torch.Tensor:
    maps, _ = make_targets(POINTS, (SIZE, SIZE), HeatmapConfig(sigma=2.5))
    return torch.from_numpy(maps.max(axis=0) * 2.0 - 1.0).float()[None, None]


def test_image_warp_and_point_map_agree():
    """Integer translations and the mirror move pixels exactly, so an equivariant model's
    views come back to float precision; jitters with rotation / scale resample bilinearly,
    and come back within the interpolation error. A warp in the wrong direction (T instead
    of T^-1) or a missing permutation would be off by pixels."""
    images = blob_image()
    shifts = [translation_matrix(3.0, -2.0), translation_matrix(-5.0, 4.0)]
    exact = TTAEstimator(BlobFinder(), shifts, flip_permutation=[1, 0]).estimate(images)
    assert exact.views.shape == (4, 1, 2, 2)
    np.testing.assert_allclose(exact.views[:, 0], np.broadcast_to(POINTS, (4, 2, 2)),
                               rtol=0, atol=1e-5)        # float32 images
    resampled = TTAEstimator(BlobFinder(), tta_matrices(CFG, SIZE)).estimate(images)
    assert np.abs(resampled.views[:, 0] - POINTS).max() < 0.1
    # Without the permutation the mirrored view swaps the pair: 23 px off.
    swapped = TTAEstimator(BlobFinder(), [], flip_permutation=[0, 1]).estimate(images)
    assert np.abs(swapped.views[1, 0] - POINTS).max() > 20


def test_warp_batch_pads_with_the_dataset_background():
    """Outside the image is 0 on [0, 1], i.e. -1 on the model input, as HeatmapDataset pads."""
    images = torch.zeros(2, 1, 8, 8)
    out = warp_batch(images, translation_matrix(4.0, 0.0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.all(out[..., :, :4] == -1.0) and torch.all(out[..., :, 4:] == 0.0)
