"""Refinement patches: the crop is an exact matrix (a point goes to the patch and back to
original pixels to float precision, and the image content moves with it), training items put
the jittered landmark where the matrix says, and pretraining crops are at the asked grid."""
from __future__ import annotations

import numpy as np
import pytest

from ddpm_landmarks.config.common import AugmentConfig, DecoderConfig, HeatmapConfig
from ddpm_landmarks.data.patches import (
    PatchDataset,
    cut_patch,
    on_patch_grid,
    patch_matrix,
    patch_pixel,
    random_crop_matrix,
    shared_patches,
    stored_to_original,
)
from ddpm_landmarks.data.sample import (
    LandmarkDataset,
    LandmarkSample,
    Record,
    original_to_stored,
)
from ddpm_landmarks.data.sample import stored_to_original as stored_to_original_points
from ddpm_landmarks.data.transforms import apply_matrix, random_affine_matrix
from ddpm_landmarks.heatmaps.decoders import decode

ORIGINAL = (1935, 2400)          # ISBI's original grid (w, h)
STORED = (413, 512)              # its stored copy


def blob_image(points_stored: np.ndarray, wh, sigma: float = 2.0) -> np.ndarray:
    """float32 (h, w) in [0, 1]: Gaussian blobs at float positions (pixel-centre convention)."""
    w, h = wh
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.zeros((h, w))
    for x, y in points_stored:
        image = np.maximum(image, np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)))
    return image.astype(np.float32)


def test_patch_pixel_and_centre():
    assert patch_pixel(ORIGINAL, 512) == pytest.approx(2400 / 512)
    m = patch_matrix((1000.25, 1200.75), 2400 / 512, 64)
    assert apply_matrix(m, np.array([1000.25, 1200.75])) == pytest.approx([31.5, 31.5])
    # One patch pixel = 4.6875 original pixels along both axes (isotropic).
    assert apply_matrix(m, np.array([1000.25 + 4.6875, 1200.75])) == pytest.approx([32.5, 31.5])
    with pytest.raises(ValueError, match="refine.grid"):
        patch_pixel(ORIGINAL, 0)


def test_point_round_trip_through_patch_is_exact():
    rng = np.random.default_rng(0)
    aug = AugmentConfig(rotation_deg=15, scale=(0.8, 1.2), shear_deg=5, translate=0.0)
    for _ in range(50):
        centre = rng.uniform([0, 0], ORIGINAL)
        m = random_affine_matrix(rng, aug, 48) @ patch_matrix(centre, rng.uniform(1, 10), 48)
        points = rng.uniform([0, 0], ORIGINAL, size=(19, 2))
        back = apply_matrix(np.linalg.inv(m), apply_matrix(m, points))
        assert np.abs(back - points).max() < 1e-3 * 1e-6       # far below the 1e-3 px target


def test_patch_content_round_trip_below_1e3_px():
    """A blob drawn at a float position of the stored image, cut into a patch at the stored
    resolution, decoded there and mapped back: with the patch on the stored pixel grid (centre
    at a stored pixel corner) the original-pixel position comes back to < 1e-3 stored px; off
    the grid, bilinear resampling of the blob moves its decoded peak by < 0.01 stored px."""
    rng = np.random.default_rng(1)
    scale = (STORED[0] / ORIGINAL[0], STORED[1] / ORIGINAL[1])
    truth = rng.uniform([300, 300], [1600, 2100], size=(6, 2))          # original px
    image = blob_image(original_to_stored(truth, scale), STORED, sigma=3.0)
    sample = LandmarkSample("x", image, truth, (0.1, 0.1), ORIGINAL)
    pixel = patch_pixel(ORIGINAL, 512)
    stored_px = 1.0 / np.array(scale)                    # original px per stored px (x, y)
    for point in truth:
        aligned = np.floor(original_to_stored(point + rng.normal(size=2) * 15.0, scale)) + 0.5
        for centre, tolerance in ((stored_to_original_points(aligned, scale), 1e-3),
                                  (point + rng.normal(size=2) * 15.0, 1e-2)):
            m = patch_matrix(centre, pixel, 64)
            patch = cut_patch(image, stored_to_original(sample), m, 64)
            found, _ = decode(patch[None], DecoderConfig(name="parabola"))
            back = apply_matrix(np.linalg.inv(m), found[0])
            assert (np.abs(back - point) / stored_px).max() < tolerance


def test_patch_grid_image_is_exact_and_cheap():
    """A grid coarser than the stored image: the image is area-resized ONCE (not per patch)
    and its matrix stays exact: a blob comes back to < 0.05 patch px through the patch."""
    rng = np.random.default_rng(5)
    scale = (STORED[0] / ORIGINAL[0], STORED[1] / ORIGINAL[1])
    truth = rng.uniform([300, 300], [1600, 2100], size=(4, 2))
    image = blob_image(original_to_stored(truth, scale), STORED, sigma=6.0)
    sample = LandmarkSample("x", image, truth, (0.1, 0.1), ORIGINAL)
    grid_image, to_original = on_patch_grid(image, stored_to_original(sample), ORIGINAL, 256)
    assert grid_image.shape == (256, 206)                 # 512 x 413 halved
    # A grid at or finer than the stored image: nothing to do.
    same, matrix = on_patch_grid(image, stored_to_original(sample), ORIGINAL, 512)
    assert same is image and np.array_equal(matrix, stored_to_original(sample))
    pixel = patch_pixel(ORIGINAL, 256)
    for point in truth:
        m = patch_matrix(point + rng.normal(size=2) * 20, pixel, 32)
        patch = cut_patch(grid_image, to_original, m, 32)
        found, _ = decode(patch[None], DecoderConfig(name="parabola"))
        assert np.abs(apply_matrix(np.linalg.inv(m), found[0]) - point).max() / pixel < 0.05


def make_dataset(n: int = 3) -> LandmarkDataset:
    rng = np.random.default_rng(2)
    scale = (STORED[0] / ORIGINAL[0], STORED[1] / ORIGINAL[1])
    records, images = [], {}
    for i in range(n):
        pts = rng.uniform([300, 300], [1600, 2100], size=(4, 2))
        if i == 1:
            pts[2] = np.nan                                  # a missing landmark: no patch
        images[f"img{i}"] = blob_image(original_to_stored(pts[np.isfinite(pts[:, 0])], scale),
                                       STORED, sigma=2.0)
        records.append(Record(f"img{i}", f"img{i}", pts, (0.1, 0.1), ORIGINAL, "train"))
    return LandmarkDataset("blobs", records, 4, image_loader=lambda p: images[str(p)])


def test_patch_dataset_items():
    dataset = make_dataset()
    jitter = np.full((3, 4, 2), 20.0)
    data = PatchDataset(dataset, AugmentConfig(rotation_deg=10, noise_std=0.0, flip_prob=0.0),
                        HeatmapConfig(sigma=2.0), patch_size=32, grid=256, jitter_px=jitter,
                        seed=3)
    assert len(data) == 11                                   # 12 landmarks, one missing
    offsets = []
    for index in range(len(data)):
        item = data[index]
        k = item["landmark"]
        assert item["image"].shape == (1, 32, 32) and item["heatmaps"].shape == (4, 32, 32)
        assert item["mask"].tolist() == [j == k for j in range(4)]     # only its own landmark
        image_index = data.items[index][0]
        truth = dataset.records[image_index].landmarks[k]
        # The target's landmark is where the patch matrix puts the truth; its inverse is exact.
        on_patch = item["landmarks"][k].double().numpy()
        assert apply_matrix(item["to_original"].numpy(), on_patch) == pytest.approx(truth, abs=1e-3)
        offsets.append(on_patch - 15.5)
    offsets = np.array(offsets) * patch_pixel(ORIGINAL, 256)          # original px
    assert 5 < np.sqrt((offsets ** 2).mean()) < 60                   # jittered by ~20 px per axis
    # Same item, same epoch: same patch (per-item randomness); another epoch: another jitter.
    assert np.array_equal(data[0]["image"], data[0]["image"])
    first = data[0]["landmarks"]
    data.set_epoch(1)
    assert not np.array_equal(first, data[0]["landmarks"])


def test_patch_dataset_visible_supervision_and_refusals():
    dataset = make_dataset()
    data = PatchDataset(dataset, AugmentConfig(flip_prob=0.0), HeatmapConfig(sigma=2.0), 256,
                        grid=256, jitter_px=np.zeros((3, 4, 2)), supervise="visible", train=False)
    # A 256-px patch at grid 256 covers most of the image: every present landmark supervised.
    assert data[0]["mask"].all()
    with pytest.raises(ValueError, match="flipped"):
        PatchDataset(dataset, AugmentConfig(flip_prob=0.5), HeatmapConfig(), 32, 256,
                     np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="jitter_px"):
        PatchDataset(dataset, AugmentConfig(flip_prob=0.0), HeatmapConfig(), 32, 256,
                     np.zeros((3, 4)))


def test_random_crop_matrix_scale():
    rng = np.random.default_rng(4)
    m = random_crop_matrix(rng, (413, 512), grid=256, size=32)
    # 256 crop pixels across the 512-px long side: a crop pixel is 2 image pixels.
    assert np.linalg.norm(m[:2, :2], axis=0) == pytest.approx([0.5, 0.5])
    centre = apply_matrix(np.linalg.inv(m), np.array([15.5, 15.5]))
    assert -0.5 <= centre[0] <= 412.5 and -0.5 <= centre[1] <= 511.5


def test_shared_patches_cover_nearby_points_once():
    """Two pairs closer than 2 r share a centre (their midpoint), a lone point keeps its own;
    radius 0 is one patch per point, exactly at the point."""
    points = np.array([[0.0, 0.0], [6.0, 0.0], [30.0, 0.0], [31.0, 0.5], [100.0, 100.0]])
    centres, member = shared_patches(points, 4.0)
    assert len(centres) == 3
    assert member[0] == member[1] and member[2] == member[3] and len(set(member)) == 3
    assert centres[member[0]] == pytest.approx([3.0, 0.0])
    assert centres[member[4]] == pytest.approx([100.0, 100.0])
    alone, own = shared_patches(points, 0.0)
    assert np.array_equal(alone, points) and np.array_equal(own, np.arange(5))


def test_shared_patches_keep_every_point_within_the_radius():
    rng = np.random.default_rng(0)
    for radius in (2.0, 8.0, 20.0):
        points = rng.uniform(0, 100, (40, 2))
        centres, member = shared_patches(points, radius)
        assert (np.linalg.norm(points - centres[member], axis=1) <= radius + 1e-9).all()
        assert len(centres) < 40 and sorted(set(member)) == list(range(len(centres)))
    # Greedy: the densest cluster first.
    points = np.array([[50.0, 50.0], [0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])
    centres, member = shared_patches(points, 1.0)
    assert member.tolist() == [1, 0, 0, 0]
