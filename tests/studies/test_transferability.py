"""Transferability estimates (studies/transferability.py): LogME against the Gaussian
marginal likelihood and the reference algorithm of You et al., the heatmap adaptation (pixel
sampling, standardised hypercolumns, images missing a landmark), H-score, SSIM and Spearman by
hand. The ranking command is tested in test_rank_sources.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_landmarks.studies.transferability import (
    FeatureStats,
    average_ranks,
    feature_statistics,
    hscore,
    labelled_task,
    log_evidence,
    logme_fit,
    logme_score,
    mean_label_map,
    sample_pixels,
    spearman,
    ssim,
)
from ddpm_landmarks.training.probe import resize_features

# ----------------------------------------------------------------------------------------------
# LogME
# ----------------------------------------------------------------------------------------------

def reference_logme(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """You et al.'s `each_evidence` (LogME reference code, eigh of F^T F, updates of alpha and
    beta through m), run to a tight tolerance without its 1e-5 epsilons."""
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    tmp = v.T @ (f.T @ y)
    alpha, beta, lam = 1.0, 1.0, 1.0
    for _ in range(1000):
        gamma = (s / (s + lam)).sum()
        m = v @ (tmp * beta / (alpha + beta * s))
        alpha_de = float(m @ m)
        alpha = gamma / alpha_de
        beta_de = float(((y - f @ m) ** 2).sum())
        beta = (n - gamma) / beta_de
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 1e-13:
            break
        lam = new_lam
    m = v @ (tmp * beta / (alpha + beta * s))
    alpha_de, beta_de = float(m @ m), float(((y - f @ m) ** 2).sum())
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
    return evidence / n, alpha, beta


def test_log_evidence_is_the_gaussian_marginal_likelihood():
    rng = np.random.default_rng(0)
    n, d = 9, 4
    f, y = rng.normal(size=(n, d)), rng.normal(size=n)
    alpha, beta = 0.7, 2.3
    # y ~ N(0, I / beta + F F^T / alpha), directly.
    cov = torch.tensor(np.eye(n) / beta + f @ f.T / alpha)
    direct = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    expected = float(direct.log_prob(torch.tensor(y))) / n
    s, v = np.linalg.eigh(f.T @ f)
    assert log_evidence(s, v.T @ f.T @ y, float(y @ y), n, alpha, beta) == \
        pytest.approx(expected, abs=1e-12)


def test_logme_fit_matches_the_reference_algorithm_and_maximises_the_evidence():
    rng = np.random.default_rng(1)
    n, d = 40, 5
    f = rng.normal(size=(n, d))
    y = f @ np.array([1.0, -0.5, 0.0, 0.2, 0.0]) + 0.3 * rng.normal(size=n)
    s, v = np.linalg.eigh(f.T @ f)
    z = v.T @ f.T @ y
    evidence, alpha, beta, _ = logme_fit(s, z, float(y @ y), n)
    ref_evidence, ref_alpha, ref_beta = reference_logme(f, y)
    assert evidence == pytest.approx(ref_evidence, abs=1e-9)
    assert alpha == pytest.approx(ref_alpha, rel=1e-5) and beta == pytest.approx(ref_beta, rel=1e-5)
    for da, db in ((1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)):
        assert log_evidence(s, z, float(y @ y), n, alpha * da, beta * db) < evidence
    # Uninformative features: alpha -> infinity, the evidence of w = 0, beta = n / |y|^2.
    noise = rng.normal(size=n)
    f0 = np.zeros((n, d))
    s0, v0 = np.linalg.eigh(f0.T @ f0)
    value = logme_fit(s0, v0.T @ f0.T @ noise, float(noise @ noise), n)[0]
    assert value == pytest.approx(-0.5 * math.log(2 * math.pi * (noise @ noise) / n) - 0.5,
                                  abs=1e-9)


def _toy_task(missing: bool = True, size: int = 8):
    """8 images of size x size with 2 landmarks; landmark 1 missing in image 3."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, size, size, generator=gen) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    centres = torch.randint(1, size - 1, (8, 2, 2), generator=gen).float()
    heatmaps = torch.exp(-((xx - centres[..., 0, None, None]) ** 2
                           + (yy - centres[..., 1, None, None]) ** 2) / (2 * 1.2 ** 2))
    mask = torch.ones(8, 2, dtype=torch.bool)
    if missing:
        mask[3, 1] = False
        heatmaps[3, 1] = 0
    batch = {"image": images, "heatmaps": heatmaps, "mask": mask}
    return labelled_task(batch, [f"img{i}" for i in range(8)], feature_size=size,
                         foreground_threshold=0.1, background_ratio=1.0, seed=0)


KERNELS = torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(3))


def toy_features(images: torch.Tensor) -> list[torch.Tensor]:
    x = F.conv2d(images, KERNELS, padding=1)
    return [x, F.avg_pool2d(torch.relu(x), 2)]          # two scales: a small hypercolumn


def test_logme_score_equals_reference_logme_on_the_standardised_sampled_pixels():
    task = _toy_task()
    total, partial = feature_statistics(toy_features, task, batch_size=3)
    assert set(partial) == {3}
    result = logme_score(total, partial, task)
    hyper = resize_features(toy_features(task.images), (8, 8)).flatten(2).double()
    for k in range(2):
        keep = [i for i in range(8) if task.mask[i, k]]
        f = torch.cat([hyper[i][:, task.pixels[i]].T for i in keep]).numpy()
        y = torch.cat([task.targets[i][:, k] for i in keep]).numpy()
        f = (f - f.mean(0)) / f.std(0)
        expected = reference_logme(f, y - y.mean())[0]
        assert result["per_landmark"][k]["evidence"] == pytest.approx(expected, abs=1e-8)
    assert result["score"] == pytest.approx(np.mean([p["evidence"] for p in result["per_landmark"]]))
    assert result["channels"] == 12 and result["samples"] == task.num_samples


def test_sample_pixels_foreground_plus_seeded_background_independent_of_order():
    task = _toy_task(missing=False, size=16)
    targets = task.heatmaps[0]                          # feature grid = model grid
    idx = sample_pixels(targets, torch.ones(2, dtype=torch.bool), 0.1, 1.0, 0, "img0")
    fg = torch.nonzero(targets.flatten(1).max(0).values > 0.1).flatten()
    assert set(fg.tolist()) <= set(idx.tolist())
    assert 0 < 2 * len(fg) < 256
    assert len(idx) == 2 * len(fg) and len(set(idx.tolist())) == len(idx)
    again = sample_pixels(targets, torch.ones(2, dtype=torch.bool), 0.1, 1.0, 0, "img0")
    assert torch.equal(idx, again)
    other_seed = sample_pixels(targets, torch.ones(2, dtype=torch.bool), 0.1, 1.0, 1, "img0")
    assert not torch.equal(idx, other_seed) and set(fg.tolist()) <= set(other_seed.tolist())
    half = sample_pixels(targets, torch.ones(2, dtype=torch.bool), 0.1, 0.5, 0, "img0")
    assert len(half) == len(fg) + round(0.5 * len(fg))
    # The draw depends on the image id, not its position in the task.
    batch = {"image": task.images.flip(0), "heatmaps": task.heatmaps.flip(0),
             "mask": task.mask.flip(0)}
    flipped = labelled_task(batch, [f"img{i}" for i in reversed(range(8))], 16, 0.1, 1.0, 0)
    assert torch.equal(flipped.pixels[-1], task.pixels[0])
    assert not torch.equal(task.pixels[1], task.pixels[0])


def test_hscore_by_hand():
    # One feature, classes 0 = {0, 2}, 1 (background) = {4, 6}: var = 5, between-class var = 4.
    f = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    y = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    stats = FeatureStats.of(f, y, torch.tensor([0, 0, 1, 1]))
    assert hscore(stats, shrinkage=0.0)["score"] == pytest.approx(4 / 5)
    scaled = FeatureStats.of(10 * f + 3, y, torch.tensor([0, 0, 1, 1]))
    assert hscore(scaled, shrinkage=0.3)["score"] == pytest.approx(4 / 5)    # standardised


# ----------------------------------------------------------------------------------------------
# SSIM, label maps, Spearman
# ----------------------------------------------------------------------------------------------

C1, C2 = 0.01 ** 2, 0.03 ** 2


def test_ssim_by_hand():
    assert ssim(torch.full((16, 16), 0.2), torch.full((16, 16), 0.6)) == \
        pytest.approx((2 * 0.2 * 0.6 + C1) / (0.2 ** 2 + 0.6 ** 2 + C1))
    # One 11 x 11 window: an impulse at its centre against zeros.
    g0 = 1.0 / sum(math.exp(-i * i / (2 * 1.5 ** 2)) for i in range(-5, 6))
    w = g0 * g0                                       # weight of the centre pixel
    impulse = torch.zeros(11, 11)
    impulse[5, 5] = 1.0
    expected = C1 * C2 / ((w * w + C1) * (w - w * w + C2))
    assert ssim(impulse, torch.zeros(11, 11)) == pytest.approx(expected, rel=1e-10)
    x = torch.rand(20, 20, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, 1 - x) < 0                          # anti-correlated structure
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))


def test_ssim_agrees_with_torchmetrics_when_installed():
    metrics = pytest.importorskip("torchmetrics.functional.image",
                                  reason="torchmetrics (a dev dependency of lightly) not installed")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(32, 32, generator=gen), torch.rand(32, 32, generator=gen)
    b = 0.5 * a + 0.5 * b
    _, full = metrics.structural_similarity_index_measure(
        b[None, None].double(), a[None, None].double(), data_range=1.0, return_full_image=True)
    # torchmetrics averages over reflect-padded borders too; Wang et al. / skimage (and ours)
    # average the windows inside the image: its map cropped by the 5 px half-window.
    assert ssim(a, b) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)


def test_mean_label_map_sums_present_landmarks_and_peaks_at_one():
    heatmaps = torch.zeros(2, 2, 4, 4)
    heatmaps[0, 0, 1, 1] = 1.0
    heatmaps[0, 1, 2, 2] = 1.0                          # missing below: ignored
    heatmaps[1, 0, 1, 1] = 0.5
    mask = torch.tensor([[True, False], [True, True]])
    out = mean_label_map(heatmaps, mask)
    assert float(out[1, 1]) == pytest.approx(1.0) and float(out.sum()) == pytest.approx(1.0)


def test_spearman_with_ties_by_hand():
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # ranks of y: 1, 2, 3.5, 5, 3.5 -> sum dx dy = 8, sum dx^2 = 10, sum dy^2 = 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [3, 3])) and math.isnan(spearman([1], [2]))
