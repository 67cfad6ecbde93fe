"""Geometry of ddpm_landmarks.data.transforms: image and landmarks must move together.

The main check draws a small Gaussian blob at every landmark, transforms image and points, and
asks that the blob's intensity centroid in the output sits near the moved point. Measured
errors are <= 0.02 px, so the tolerance is 0.1 px rather than 1 px: a half-pixel slip anywhere
in the chain (the classic resize bug) then fails the test instead of hiding under it.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from ddpm_landmarks.config.common import AugmentConfig, DataConfig
from ddpm_landmarks.data.sample import LandmarkSample, original_to_stored
from ddpm_landmarks.data.transforms import (
    LandmarkTransform,
    antialias_plan,
    apply_matrix,
    flip_landmark_labels,
    map_to_original,
    original_to_model_matrix,
    original_to_stored_matrix,
    random_affine_matrix,
    resize_matrix,
    visible_mask,
    warp_image,
)

NO_AUG = AugmentConfig(rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, shear_deg=0.0,
                       flip_prob=0.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0),
                       clahe_prob=0.0, noise_std=0.0, blur_prob=0.0)


def geometric(**changes) -> AugmentConfig:
    """Only the named geometric augmentations, no intensity changes (they would move centroids)."""
    return dataclasses.replace(NO_AUG, **changes)


def draw_blobs(shape, points, sigma, amplitudes=None) -> np.ndarray:
    """float32 image with a Gaussian blob (peak = amplitude) at each (x, y), drawn locally."""
    image = np.zeros(shape, np.float32)
    amplitudes = np.ones(len(points)) if amplitudes is None else amplitudes
    r = int(np.ceil(5 * sigma))
    for (x, y), a in zip(points, amplitudes):
        x0, x1 = max(0, int(x) - r), min(shape[1], int(x) + r + 2)
        y0, y1 = max(0, int(y) - r), min(shape[0], int(y) + r + 2)
        xs, ys = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
        image[y0:y1, x0:x1] += a * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    return image


def centroid(image, point, radius):
    """Intensity centroid and mass of the square window of `radius` around `point`."""
    cx, cy = int(round(point[0])), int(round(point[1]))
    win = image[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1].astype(np.float64)
    ys, xs = np.mgrid[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
    mass = win.sum()
    return np.array([(win * xs).sum() / mass, (win * ys).sum() / mass]), mass


def random_points(rng, wh, k, margin=0.15, min_dist=0.2):
    """k float points in the central part of a (w, h) grid, at least min_dist * max(w, h) apart
    (a neighbouring blob inside the centroid window would pull the centroid)."""
    w, h = wh
    points = []
    for _ in range(10000):
        p = rng.uniform([margin * w, margin * h], [(1 - margin) * w, (1 - margin) * h])
        if all(np.hypot(*(p - q)) > min_dist * max(w, h) for q in points):
            points.append(p)
        if len(points) == k:
            return np.array(points)
    raise AssertionError("could not place the test landmarks")


def make_sample(original_wh, stored_wh, landmarks, sigma_out, size, amplitudes=None):
    """Sample whose stored image has a blob at each landmark, about sigma_out px on the model grid."""
    scale = (stored_wh[0] / original_wh[0], stored_wh[1] / original_wh[1])
    sigma_stored = sigma_out * max(stored_wh) / size
    image = draw_blobs((stored_wh[1], stored_wh[0]), original_to_stored(landmarks, scale),
                       sigma_stored, amplitudes)
    return LandmarkSample(id="s", image=image, landmarks=np.asarray(landmarks, np.float64),
                          spacing_mm=None, original_size=tuple(original_wh))


def check_blobs(out, size, sigma_out, tol=0.1, min_checked=2):
    """Every blob whose window lies inside the grid has its centroid within tol of its landmark."""
    radius = int(np.ceil(3.5 * sigma_out * 1.3))  # 1.3: largest scale augmentation
    checked, masses = 0, {}
    for k, p in enumerate(out.landmarks):
        if not out.visible[k] or not (radius + 1 <= p).all() or not (p <= size - radius - 2).all():
            continue
        c, masses[k] = centroid(out.image, p, radius)
        assert np.hypot(*(c - p)) < tol, f"landmark {k}: blob at {c}, point at {p}"
        checked += 1
    assert checked >= min_checked, f"only {checked} landmarks could be checked"
    return masses


SIZE = 96
CASES = {
    "rotation": geometric(rotation_deg=40.0),
    "scale": geometric(scale=(0.7, 1.3)),
    "translation": geometric(translate=0.15),
    "shear": geometric(shear_deg=20.0),
    "flip": geometric(flip_prob=1.0),
    "all": geometric(rotation_deg=25.0, scale=(0.8, 1.2), translate=0.1, shear_deg=10.0,
                     flip_prob=0.5),
}


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resize_moves_blobs_with_points(mode, seed):
    rng = np.random.default_rng(seed)
    wh = (300, 200) if seed % 2 else (180, 310)   # landscape and portrait
    landmarks = random_points(rng, wh, 5)
    sample = make_sample(wh, wh, landmarks, 1.5, SIZE)
    out = LandmarkTransform(DataConfig(image_size=SIZE, resize_mode=mode), NO_AUG)(sample)
    assert out.image.shape == (SIZE, SIZE) and out.image.dtype == np.float32
    assert not out.flipped and out.visible.all()
    check_blobs(out, SIZE, 1.5, min_checked=5)


def test_letterbox_is_isotropic_and_centred():
    m = resize_matrix((300, 200), (96, 96), "letterbox")
    assert m[0, 0] == pytest.approx(m[1, 1]) == pytest.approx(96 / 300)
    corners = apply_matrix(m, [[-0.5, -0.5], [299.5, 199.5]])
    np.testing.assert_allclose(corners[:, 0], [-0.5, 95.5])
    assert corners[0, 1] + 0.5 == pytest.approx(95.5 - corners[1, 1])  # equal padding


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augmentation_moves_blobs_with_points(case, seed):
    rng = np.random.default_rng(100 + seed)
    wh = (160, 140)
    sample = make_sample(wh, wh, random_points(rng, wh, 6, min_dist=0.18), 1.5, SIZE)
    transform = LandmarkTransform(DataConfig(image_size=SIZE), CASES[case],
                                  flip_permutation=[1, 0, 3, 2, 4, 5], train=True)
    out = transform(sample, np.random.default_rng(seed))
    plain = LandmarkTransform(DataConfig(image_size=SIZE), NO_AUG)(sample)
    assert not np.allclose(out.landmarks, plain.landmarks), "augmentation did nothing"
    check_blobs(out, SIZE, 1.5, min_checked=3)


def test_flip_moves_labels_with_blobs():
    """Blobs of distinct brightness: after a flip, label j must sit on old landmark perm^-1(j)."""
    rng = np.random.default_rng(7)
    wh = (160, 140)
    amplitudes = np.array([0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
    perm = [1, 2, 0, 4, 3, 5]       # a 3-cycle tells the two possible conventions apart
    sample = make_sample(wh, wh, random_points(rng, wh, 6, min_dist=0.18), 1.5, SIZE, amplitudes)
    out = LandmarkTransform(DataConfig(image_size=SIZE), geometric(flip_prob=1.0, rotation_deg=10),
                            flip_permutation=perm, train=True)(sample, np.random.default_rng(0))
    assert out.flipped
    masses = check_blobs(out, SIZE, 1.5, min_checked=6)
    expected = np.empty(6)
    expected[perm] = amplitudes     # new[perm[i]] = old[i]
    measured = np.array([masses[k] for k in range(6)])
    np.testing.assert_allclose(measured / measured.max(), expected / expected.max(), rtol=0.03)


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_stored_grid_differs_from_original(mode, seed):
    """2400 x 1935 original stored as 512 x 413; float landmarks in original pixels."""
    landmarks = np.array([[1203.37, 967.81], [612.9, 480.25], [1800.5, 1400.75],
                          [700.12, 1450.6], [1750.0, 520.33]])
    size = 256
    sample = make_sample((2400, 1935), (512, 413), landmarks, 1.5, size)
    aug = CASES["all"] if seed is not None else NO_AUG
    transform = LandmarkTransform(DataConfig(image_size=size, resize_mode=mode), aug,
                                  flip_permutation=[0, 1, 2, 4, 3], train=seed is not None)
    out = transform(sample, np.random.default_rng(seed))
    check_blobs(out, size, 1.5, min_checked=4)
    if seed is None:   # the plain resize agrees with sample.original_to_stored
        stored = apply_matrix(original_to_stored_matrix((2400, 1935), (512, 413)), landmarks)
        np.testing.assert_allclose(stored, sample.landmarks_on_stored_grid(), atol=1e-9)


@pytest.mark.parametrize("seed", [None, 3])
def test_large_downscale_is_antialiased_and_exact(seed):
    """A 2000 px image to 128 px goes through INTER_AREA first; blobs and points still agree."""
    rng = np.random.default_rng(5)
    wh, size = (2000, 1600), 128
    sample = make_sample(wh, wh, random_points(rng, wh, 5, margin=0.25), 1.5, size)
    transform = LandmarkTransform(DataConfig(image_size=size), CASES["all"],
                                  flip_permutation=[0, 1, 2, 3, 4], train=seed is not None)
    assert antialias_plan(wh, original_to_model_matrix(wh, size, "stretch")) == (128, 128)
    check_blobs(transform(sample, np.random.default_rng(seed)), size, 1.5, min_checked=4)

    # A 1-px checkerboard has no content a 128 px grid can show: the result must be flat grey,
    # where a bare bilinear warp would alias it into stripes.
    board = (np.indices((1600, 2000)).sum(axis=0) % 2).astype(np.float32)
    m = original_to_model_matrix(wh, size, "stretch")
    smooth = warp_image(board, m, size)[4:-4, 4:-4]
    assert abs(smooth.mean() - 0.5) < 0.02 and smooth.std() < 0.01
    naive = cv2.warpAffine(board, m[:2], (size, size), flags=cv2.INTER_LINEAR)[4:-4, 4:-4]
    assert naive.std() > 0.1


def test_warp_matches_cv2_resize():
    """Our resize matrix + warpAffine samples where cv2.resize samples (same convention)."""
    image = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)
    for dst in [(70, 50), (96, 96), (41, 37)]:
        ours = warp_image(image, resize_matrix((70, 50), dst, "stretch"), dst)
        ref = cv2.resize(image, dst, interpolation=cv2.INTER_LINEAR)
        # keep away from the border, where warpAffine pads with 0 and resize replicates
        np.testing.assert_allclose(ours[1:-1, 1:-1], ref[1:-1, 1:-1], atol=2e-3)


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_original_model_original(seed):
    rng = np.random.default_rng(seed)
    landmarks = rng.uniform([0, 0], [2400, 1935], size=(8, 2))
    landmarks[3] = np.nan
    sample = LandmarkSample(id="s", image=np.zeros((413, 512), np.float32), landmarks=landmarks,
                            spacing_mm=None, original_size=(2400, 1935))
    perm = [1, 0, 2, 3, 5, 4, 7, 6]
    aug = geometric(rotation_deg=30, scale=(0.7, 1.4), translate=0.2, shear_deg=15, flip_prob=0.5)
    for mode in ("stretch", "letterbox"):
        transform = LandmarkTransform(DataConfig(image_size=256, resize_mode=mode), aug,
                                      flip_permutation=perm, train=True)
        out = transform(sample, rng)
        back = map_to_original(out.landmarks, out.to_original)
        if out.flipped:            # undo the relabelling: new[perm[i]] = old[i]
            back = back[perm]
        assert back.dtype == np.float64
        assert np.isnan(back[3]).all() and not out.visible[3]
        np.testing.assert_allclose(back[~np.isnan(landmarks[:, 0])],
                                   landmarks[~np.isnan(landmarks[:, 0])], atol=1e-3)
        # and the matrices are exact inverses
        points = rng.uniform(-50, 300, size=(20, 2))
        np.testing.assert_allclose(
            apply_matrix(out.to_original, apply_matrix(np.linalg.inv(out.to_original), points)),
            points, atol=1e-6)


def test_half_pixel_convention():
    m = resize_matrix((400, 400), (100, 100), "stretch")
    np.testing.assert_allclose(apply_matrix(m, [[1.5, 1.5]]), [[0.0, 0.0]], atol=1e-12)
    pts = np.random.default_rng(0).uniform(0, 2400, (10, 2))
    np.testing.assert_allclose(apply_matrix(original_to_stored_matrix((2400, 1935), (512, 413)), pts),
                               original_to_stored(pts, (512 / 2400, 413 / 1935)), atol=1e-9)


@pytest.mark.parametrize("dst", [(100, 80), (137, 109), (50, 40)])
@pytest.mark.parametrize("interp", [cv2.INTER_AREA, cv2.INTER_LINEAR])
def test_resize_matrix_agrees_with_cv2_resize(dst, interp):
    """A smooth blob at an integer pixel lands, after cv2.resize, where the matrix maps it."""
    src = (400, 320)
    dot = (201.0, 157.0)
    image = draw_blobs((src[1], src[0]), [dot], sigma=8.0)
    small = cv2.resize(image, dst, interpolation=interp).astype(np.float64)
    ys, xs = np.indices(small.shape)
    measured = np.array([(small * xs).sum(), (small * ys).sum()]) / small.sum()
    expected = apply_matrix(resize_matrix(src, dst, "stretch"), [dot])[0]
    assert np.hypot(*(measured - expected)) < 0.05, (measured, expected)


def test_flip_refused_without_permutation():
    with pytest.raises(ValueError, match="isbi2015.*permutation"):
        LandmarkTransform(DataConfig(dataset="isbi2015"), geometric(flip_prob=0.5), None, train=True)
    LandmarkTransform(DataConfig(dataset="isbi2015"), geometric(flip_prob=0.0), None, train=True)


def test_flip_swaps_left_and_right_labels():
    """Identity resize (100 -> 100), flip only: x' = 99 - x and left/right labels swap."""
    image = np.zeros((100, 100), np.float32)
    image[30, 20], image[40, 79] = 1.0, 0.5
    landmarks = np.array([[20.0, 30.0], [79.0, 40.0], [50.0, 60.0]])   # left, right, centre
    sample = LandmarkSample("s", image, landmarks, None, (100, 100))
    out = LandmarkTransform(DataConfig(image_size=100), geometric(flip_prob=1.0),
                            flip_permutation=[1, 0, 2], train=True)(sample, np.random.default_rng(0))
    assert out.flipped
    np.testing.assert_allclose(out.landmarks, [[20.0, 40.0], [79.0, 30.0], [49.0, 60.0]])
    np.testing.assert_allclose(out.image, np.fliplr(image), atol=1e-6)
    # the image content under each label: new left (label 0) is the old right dot
    assert out.image[40, 20] == pytest.approx(0.5) and out.image[30, 79] == pytest.approx(1.0)


def test_flip_label_convention_with_a_cycle():
    points = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    new = flip_landmark_labels(points, [1, 2, 0])   # old 0 -> label 1, old 1 -> 2, old 2 -> 0
    np.testing.assert_array_equal(new, [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError):
        flip_landmark_labels(points, [0, 0, 1])


def test_eval_is_deterministic_and_keeps_offgrid_points():
    landmarks = np.array([[10.0, 10.0], [-20.0, 5.0], [np.nan, np.nan], [99.5, 99.5]])
    sample = LandmarkSample("s", np.random.default_rng(0).random((100, 100)).astype(np.float32),
                            landmarks, None, (100, 100))
    transform = LandmarkTransform(DataConfig(image_size=50), AugmentConfig(), train=False)
    a, b = transform(sample), transform(sample, np.random.default_rng(1))
    np.testing.assert_array_equal(a.image, b.image)
    assert not a.flipped
    np.testing.assert_allclose(a.landmarks[1], [-10.25, 2.25])   # kept, not made NaN
    np.testing.assert_array_equal(a.visible, [True, False, False, True])


def test_visible_mask_edges():
    pts = np.array([[-0.5, 0], [-0.51, 0], [9.5, 9.5], [9.51, 0], [np.nan, 1]])
    np.testing.assert_array_equal(visible_mask(pts, 10), [True, False, True, False, False])


def test_random_affine_is_seeded_and_about_the_centre():
    cfg = geometric(rotation_deg=30, scale=(0.8, 1.2), shear_deg=10)
    a = random_affine_matrix(np.random.default_rng(3), cfg, 64)
    np.testing.assert_array_equal(a, random_affine_matrix(np.random.default_rng(3), cfg, 64))
    np.testing.assert_allclose(apply_matrix(a, [[31.5, 31.5]]), [[31.5, 31.5]], atol=1e-9)
    np.testing.assert_allclose(a[2], [0, 0, 1])


def test_affine_prob_and_replicate_border():
    """affine_prob: the share of images that get the affine (identity otherwise); border
    replicate fills outside the image with its edge, not 0 (the released ShiftScaleRotate)."""
    from ddpm_landmarks.data.transforms import random_affine_matrix, warp_image
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(rotation_deg=2.0, scale=(1.0, 1.0), translate=0.02, affine_prob=0.5)
    identity = [np.array_equal(random_affine_matrix(rng, cfg, 64), np.eye(3)) for _ in range(400)]
    assert 0.4 < np.mean(identity) < 0.6
    always = AugmentConfig(rotation_deg=2.0, affine_prob=1.0)
    assert not np.array_equal(random_affine_matrix(np.random.default_rng(0), always, 64),
                              np.eye(3))
    image = np.full((20, 20), 0.5, np.float32)
    shift = np.array([[1.0, 0, 5], [0, 1, 0], [0, 0, 1]])          # 5 px to the right
    assert warp_image(image, shift, 20)[:, :5].max() == 0.0
    assert np.allclose(warp_image(image, shift, 20, "replicate"), 0.5)
