"""The two-stage predictor's geometry and guards, with a 'local network' whose heatmap is the
patch itself (so stage 2 finds the brightest blob near stage 1's point): refined points land
on the blob in original pixels, per-landmark iterations, the displacement limit, the stage-1
prior against a brighter look-alike, flip TTA, and the per-landmark choice."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.data.patches import patch_pixel
from ddpm_landmarks.data.sample import original_to_stored
from ddpm_landmarks.data.transforms import (
    apply_matrix,
    original_to_model_matrix,
    original_to_stored_matrix,
)
from ddpm_landmarks.heatmaps.targets import gaussian_heatmaps
from ddpm_landmarks.inference.two_stage import (
    PatchRefiner,
    RefineSettings,
    Source,
    choose_iterations,
)

ORIGINAL = (1935, 2400)
STORED = (413, 512)
SCALE = (STORED[0] / ORIGINAL[0], STORED[1] / ORIGINAL[1])
K = 3


class PatchIsHeatmap(nn.Module):
    """Every landmark's heatmap is the patch, in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return ((x + 1) / 2).repeat(1, K, 1, 1)


def blobs(points_original, heights=None, sigma=2.0) -> np.ndarray:
    w, h = STORED
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.zeros((h, w))
    for (x, y), a in zip(original_to_stored(points_original, SCALE),
                         heights or [1.0] * len(points_original)):
        image = np.maximum(image, a * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)))
    return image.astype(np.float32)


def source(image) -> Source:
    to_model = original_to_model_matrix(ORIGINAL, 64, "stretch")
    stored_to_orig = np.linalg.inv(original_to_stored_matrix(ORIGINAL, STORED))
    return Source(image, stored_to_orig, np.linalg.inv(to_model), ORIGINAL)


def refiner(iterations=1, prior_weight=0.0, max_shift_px=None, grid=512, flip=None,
            share_radius=0.0, model=None):
    cfg = FinetuneConfig()
    cfg.refine = dataclasses.replace(cfg.refine, patch_size=32, grid=grid,
                                     prior_weight=prior_weight, share_radius=share_radius)
    cfg.heatmap = dataclasses.replace(cfg.heatmap, sigma=1.5)        # the prior's window: 3 px
    settings = RefineSettings([iterations] * K if np.isscalar(iterations) else list(iterations),
                              max_shift_px)
    return PatchRefiner(model or PatchIsHeatmap(), cfg, settings, flip_permutation=flip,
                        flip_tta=flip is not None)


TRUTH = np.array([[500.0, 700.0], [1200.3, 1500.7], [900.0, 2000.0]])
OFFSET = np.array([[30.0, -20.0], [-12.0, 8.0], [10.0, 35.0]])      # stage 1's error, orig px


def run(ref, image, stage1=TRUTH + OFFSET, maps=None, explore=False):
    maps = np.zeros((1, K, 64, 64), np.float32) if maps is None else maps
    return ref.refine(maps, stage1[None], np.ones((1, K)), [source(image)], explore=explore)


def test_refined_points_land_on_the_blobs_in_original_pixels():
    out = run(refiner(), blobs(TRUTH))
    stored_px = 1 / np.array(SCALE)
    assert (np.abs(out.final[0] - TRUTH) / stored_px).max() < 0.02
    assert np.array_equal(out.stage1[0], TRUTH + OFFSET)
    assert len(out.history) == 2 and np.isfinite(out.patch_to_original).all()
    # The last patch's matrix maps its own centre to the point the patch was cut around.
    centre = apply_matrix(out.patch_to_original[0, 0], np.array([15.5, 15.5]))
    assert centre == pytest.approx(TRUTH[0] + OFFSET[0])


def test_per_landmark_iterations_and_explore():
    out = run(refiner(iterations=[0, 1, 2]), blobs(TRUTH))
    assert np.array_equal(out.final[0, 0], TRUTH[0] + OFFSET[0])     # 0: stage 1 kept
    assert np.isnan(out.patch_to_original[0, 0]).all()
    assert np.abs(out.final[0, 1:] - TRUTH[1:]).max() < 0.1
    explored = run(refiner(iterations=[0, 1, 2]), blobs(TRUTH), explore=True)
    assert len(explored.history) == 3
    assert np.abs(explored.history[1][0, 0] - TRUTH[0]).max() < 0.1  # refined when exploring
    assert np.array_equal(explored.final, out.final)


def test_displacement_limit_keeps_stage_1():
    pixel = patch_pixel(ORIGINAL, 512)
    shift = np.hypot(*OFFSET.T) / pixel                               # patch px per landmark
    assert shift[1] < 4 < min(shift[0], shift[2])                   # 3.1 vs 7.7 patch px
    out = run(refiner(max_shift_px=4.0), blobs(TRUTH))
    moved = np.abs(out.final[0] - out.stage1[0]).max(axis=1) > 0
    assert moved.tolist() == [False, True, False]
    assert np.abs(out.final[0, 1] - TRUTH[1]).max() < 0.1


def test_stage1_prior_avoids_a_brighter_look_alike():
    """A brighter blob 8 patch px from the truth: the patch alone jumps to it; the stage-1
    heatmap (centred on stage 1's point, near the truth) as a prior keeps the true one."""
    pixel = patch_pixel(ORIGINAL, 512)
    decoy = TRUTH + np.array([8 * pixel, 0.0])
    image = blobs(np.concatenate([TRUTH, decoy]), [0.6] * K + [1.0] * K)
    stage1 = TRUTH + np.array([-1.5 * pixel, 0.0])
    to_model = original_to_model_matrix(ORIGINAL, 64, "stretch")
    maps = gaussian_heatmaps(apply_matrix(to_model, stage1), (64, 64), sigma=0.4)[None]
    alone = run(refiner(), image, stage1=stage1)
    assert np.abs(alone.final[0] - decoy).max() < 1.0
    guided = run(refiner(prior_weight=1.0), image, stage1=stage1, maps=maps)
    # Located on the local map alone: no pull towards stage 1's point.
    assert np.abs(guided.final[0] - TRUTH).max() < 0.1


def test_flip_tta_mirrors_back():
    """Averaging with the mirrored patch, mirrored back (identity permutation here), finds
    the same blob: a wrong mirror would give two peaks and move the point."""
    plain = run(refiner(), blobs(TRUTH))
    flipped = run(refiner(flip=list(range(K))), blobs(TRUTH))
    assert np.abs(flipped.final - plain.final).max() < 0.05


class ChannelTimesIndex(nn.Module):
    """Channel k = the patch times (k + 1): which patch and which channel a map came from."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * torch.arange(1, K + 1, dtype=x.dtype)[None, :, None, None]


def test_local_heatmaps_read_each_landmark_on_its_patch():
    patches = np.random.default_rng(0).uniform(0, 1, (2, 32, 32)).astype(np.float32)
    ref = refiner(model=ChannelTimesIndex())
    ref.chunk = 1                                       # patches in separate forwards too
    maps = ref.local_heatmaps(patches, np.array([2, 0, 1]), np.array([1, 1, 0]))
    expected = [(patches[1] * 2 - 1) * 3, (patches[1] * 2 - 1) * 1, (patches[0] * 2 - 1) * 2]
    assert np.allclose(maps, np.stack(expected), atol=1e-6)


def test_shared_patch_refines_neighbours_in_one_forward():
    """Landmarks 0 and 1 five patch px apart, equally bright: with refine.share_radius they are
    read on one patch (2 forwards for 3 landmarks), the stage-1 prior picks each one's blob,
    and each lands on its own truth in original pixels, as with a patch per landmark."""
    pixel = patch_pixel(ORIGINAL, 512)
    truth = TRUTH.copy()
    truth[1] = truth[0] + np.array([4.0, 3.0]) * pixel
    stage1 = truth + np.array([[1.2, -0.8], [-1.0, 1.1], [0.9, 1.3]]) * pixel
    to_model = original_to_model_matrix(ORIGINAL, 64, "stretch")
    maps = np.stack([gaussian_heatmaps(apply_matrix(to_model, p[None]), (64, 64), sigma=0.3)[0]
                     for p in stage1])[None]
    image = blobs(truth)
    own = run(refiner(prior_weight=1.0), image, stage1=stage1, maps=maps)
    shared = run(refiner(prior_weight=1.0, share_radius=4.0), image, stage1=stage1, maps=maps)
    assert own.patches.tolist() == [3] and shared.patches.tolist() == [2]
    stored_px = 1 / np.array(SCALE)
    for out in (own, shared):
        assert (np.abs(out.final[0] - truth) / stored_px).max() < 0.05
    # Both read on the same patch: one matrix, centred between their stage-1 points.
    assert np.array_equal(shared.patch_to_original[0, 0], shared.patch_to_original[0, 1])
    centre = apply_matrix(shared.patch_to_original[0, 0], np.array([15.5, 15.5]))
    assert centre == pytest.approx(stage1[:2].mean(axis=0))


def test_choose_iterations():
    errors = np.array([
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]],          # stage 1
        [[0.5, 2.5, 3.0], [0.5, 2.5, 3.0]],          # one refinement
        [[0.6, 1.0, 3.0], [0.6, 3.2, 3.0]],          # two (landmark 1: mean 2.1 > 2.0)
    ])
    assert choose_iterations(errors) == [1, 0, 0]    # ties go to the fewer refinements
    errors[2, 0, 2] = np.inf                         # a miss is worse than any error
    assert choose_iterations(errors)[2] == 0
