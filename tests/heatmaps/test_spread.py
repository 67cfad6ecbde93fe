"""Heatmap spread: the covariance of a known Gaussian is recovered, NaN where undefined."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_landmarks.config.common import HeatmapConfig
from ddpm_landmarks.heatmaps.spread import auto_window, spread_covariance

SIZE = 48


def gaussian(centre, cov, size=SIZE):
    """exp(-d^T cov^-1 d / 2) sampled at pixel centres (x, y order)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.stack([xx - centre[0], yy - centre[1]], axis=-1)
    return np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d))


def test_moments_recover_a_rotated_anisotropic_gaussian():
    # Sampled on the grid, a Gaussian with sigma >= 1 keeps its covariance to ~1e-7 (the
    # Poisson-summation error is ~exp(-2 pi^2 sigma^2)); a window of 6 sigma leaves no tail.
    cov = np.array([[4.0, 1.5], [1.5, 2.25]])
    got = spread_covariance(gaussian((20.3, 25.7), cov)[None], "moments", window=15)[0]
    np.testing.assert_allclose(got, cov, rtol=0, atol=1e-6)


def test_moments_scale_with_sigma_and_the_window_cuts_tails():
    maps = np.stack([gaussian((23.4, 22.1), np.eye(2) * s ** 2) for s in (1.0, 1.5, 3.0)])
    wide = spread_covariance(maps, "moments", window=18)
    np.testing.assert_allclose(wide[:, 0, 0], [1.0, 2.25, 9.0], rtol=1e-6)
    # The default window (3 sigma at sigma 1.5 = 5 px) underestimates slightly, never more.
    w = auto_window(HeatmapConfig(sigma=1.5))
    assert w == 5
    cut = spread_covariance(maps[1], "moments", window=w)
    assert 0.99 * 2.25 < cut[0, 0] < 2.25


def test_gaussian_fit_is_exact_for_an_axis_aligned_gaussian():
    cov = np.diag([2.25, 5.0])
    got = spread_covariance(gaussian((30.6, 10.2), cov), "gaussian_fit")
    np.testing.assert_allclose(got, cov, rtol=1e-9, atol=1e-12)


def test_batched_torch_input_and_undefined_channels():
    good = gaussian((10.0, 12.0), np.eye(2) * 2.0)
    flat = np.zeros((SIZE, SIZE))
    nan = np.full((SIZE, SIZE), np.nan)
    edge = gaussian((0.0, 12.0), np.eye(2) * 2.0)          # argmax on the left border
    maps = torch.from_numpy(np.stack([[good, flat], [nan, edge]])).float()
    for method in ("moments", "gaussian_fit"):
        cov = spread_covariance(maps, method, window=8)
        assert cov.shape == (2, 2, 2, 2)
        assert np.isfinite(cov[0, 0]).all()
        assert np.isnan(cov[0, 1]).all() and np.isnan(cov[1, 0]).all()
    # gaussian_fit has no left neighbour on the edge: x undefined; moments clip the window.
    assert np.isnan(spread_covariance(edge, "gaussian_fit")[0, 0])
    assert np.isfinite(spread_covariance(edge, "moments", window=8)).all()


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown spread method 'wide'"):
        spread_covariance(np.zeros((1, 4, 4)), "wide")
