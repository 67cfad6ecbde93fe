"""Heatmap targets and decoders: round trip, missing channels, batching."""
from __future__ import annotations

import numpy as np
import pytest

from ddpm_landmarks.config.common import DecoderConfig, HeatmapConfig
from ddpm_landmarks.heatmaps.decoders import DECODERS, decode
from ddpm_landmarks.heatmaps.targets import (
    disc_heatmaps,
    gaussian_heatmaps,
    landmark_mask,
    make_targets,
)

H, W = 48, 64          # non-square on purpose: an x/y mix-up cannot pass


def random_points(rng, n, lo, hi):
    """Float points between `lo` and `hi` px from a randomly chosen edge on each axis."""
    p = rng.uniform(lo, hi, size=(n, 2))
    flip = rng.random((n, 2)) < 0.5
    return np.where(flip, np.array([W - 1, H - 1]) - p, p)


# ---------------------------------------------------------------------------- targets

def test_gaussian_heatmap_values_at_pixel_centres():
    pts = np.array([[10.3, 20.7]])
    hm = gaussian_heatmaps(pts, (H, W), sigma=2.0)
    assert hm.shape == (1, H, W) and hm.dtype == np.float32
    yy, xx = np.mgrid[0:H, 0:W]
    expected = np.exp(-((xx - 10.3) ** 2 + (yy - 20.7) ** 2) / (2 * 2.0 ** 2))
    np.testing.assert_allclose(hm[0], expected, atol=1e-6)
    # Peak pixel is the nearest one (x=10, y=21): row index is y.
    assert np.unravel_index(hm[0].argmax(), hm[0].shape) == (21, 10)
    # On a pixel centre the peak is exactly 1.
    assert gaussian_heatmaps(np.array([[5.0, 7.0]]), (H, W), 3.0)[0, 7, 5] == 1.0


def test_disc_heatmap_is_thresholded_distance():
    pts = np.array([[30.25, 10.5]])
    hm = disc_heatmaps(pts, (H, W), radius=5.0)
    yy, xx = np.mgrid[0:H, 0:W]
    expected = ((xx - 30.25) ** 2 + (yy - 10.5) ** 2) <= 25.0
    np.testing.assert_array_equal(hm[0], expected.astype(np.float32))
    assert set(np.unique(hm)) == {0.0, 1.0}
    # Distance exactly equal to the radius is inside (<=).
    assert disc_heatmaps(np.array([[10.0, 10.0]]), (H, W), 3.0)[0, 10, 13] == 1.0


def test_missing_point_gives_zero_map_and_false_mask():
    pts = np.array([[10.0, 10.0], [np.nan, np.nan], [np.nan, 5.0]])
    for maps in (gaussian_heatmaps(pts, (H, W), 2.0), disc_heatmaps(pts, (H, W), 3.0)):
        assert maps[0].max() > 0
        assert not maps[1:].any()
    np.testing.assert_array_equal(landmark_mask(pts), [True, False, False])


def test_mask_far_outside_grid():
    pts = np.array([[-0.5, 0.0], [W - 0.5, H - 0.5], [-3.0, 10.0], [10.0, H + 20.0]])
    np.testing.assert_array_equal(landmark_mask(pts, (H, W)), [True, True, False, False])
    np.testing.assert_array_equal(landmark_mask(pts, (H, W), margin=5), [True, True, True, False])


@pytest.mark.parametrize("kind", ["gaussian", "disc"])
def test_make_targets(kind):
    cfg = HeatmapConfig(kind=kind, sigma=2.0, disc_radius=4.0)
    pts = np.array([[10.0, 10.0], [np.nan, np.nan], [-2.0, 10.0], [10.0, -100.0]])
    maps, mask = make_targets(pts, (H, W), cfg)
    assert maps.shape == (4, H, W) and maps.dtype == np.float32
    # Just outside is kept (its tail is on the grid); far outside is masked and zeroed.
    np.testing.assert_array_equal(mask, [True, False, True, False])
    assert not maps[~mask].any()
    assert maps[2].max() > 0


# ---------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("sigma", [2.0, 2.5, 3.0])
@pytest.mark.parametrize("name", ["parabola", "soft_argmax"])
def test_subpixel_round_trip_interior(name, sigma):
    truth = random_points(np.random.default_rng(int(sigma * 10)), 200, 2.0, 30.0)
    pts, conf = DECODERS[name](gaussian_heatmaps(truth, (H, W), sigma), DecoderConfig())
    err = np.linalg.norm(pts - truth, axis=1)
    assert err.max() < 0.1, f"{name} sigma {sigma}: max error {err.max():.3f} px"
    assert (conf > 0.5).all()


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_parabola_near_border_and_exact_for_gaussian(sigma):
    rng = np.random.default_rng(7)
    truth = random_points(rng, 300, 0.6, 2.0)       # argmax 0-2 px from the edge, not on it
    pts, _ = DECODERS["parabola"](gaussian_heatmaps(truth, (H, W), sigma), DecoderConfig())
    assert np.abs(pts - truth).max() < 1e-3          # log-parabola is exact for a Gaussian


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_argmax_within_half_pixel(sigma):
    truth = random_points(np.random.default_rng(3), 300, 0.0, 30.0)
    pts, _ = DECODERS["argmax"](gaussian_heatmaps(truth, (H, W), sigma), DecoderConfig())
    assert np.abs(pts - truth).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(pts, np.round(pts))


def test_contour_matches_original_policy():
    # Symmetric blobs (centre on a pixel or between pixels): centroid exact.
    truth = np.array([[20.0, 15.0], [30.5, 25.5], [40.0, 10.5]])
    pts, conf = DECODERS["contour"](gaussian_heatmaps(truth, (H, W), 3.0), DecoderConfig())
    np.testing.assert_allclose(pts, truth, atol=1e-9)
    np.testing.assert_allclose(conf, gaussian_heatmaps(truth, (H, W), 3.0).max(axis=(1, 2)))
    # Random float positions away from the edge: quantised, but within a third of a pixel.
    truth = random_points(np.random.default_rng(5), 200, 6.0, 30.0)
    pts, _ = DECODERS["contour"](gaussian_heatmaps(truth, (H, W), 2.5), DecoderConfig())
    assert np.linalg.norm(pts - truth, axis=1).max() < 0.35


def test_contour_takes_largest_blob_and_handles_single_pixel():
    hm = np.zeros((2, H, W), np.float32)
    hm[0, 5:8, 5:8] = 0.9                   # small blob
    hm[0, 20:30, 40:50] = 0.8               # larger blob, lower peak: still the one chosen
    hm[1, 12, 33] = 1.0                     # one pixel: zero-area contour
    pts, conf = DECODERS["contour"](hm, DecoderConfig(contour_threshold=0.5))
    np.testing.assert_allclose(pts, [[44.5, 24.5], [33.0, 12.0]])
    np.testing.assert_allclose(conf, [0.9, 1.0])


@pytest.mark.parametrize("name", list(DECODERS))
def test_missing_channels_are_nan_never_origin(name):
    ok = gaussian_heatmaps(np.array([[20.3, 30.6]]), (H, W), 2.0)[0]
    channels = [
        ok,
        np.full((H, W), np.nan),                  # all NaN
        np.zeros((H, W)),                         # constant zero
        np.full((H, W), 0.7),                     # constant above min_peak
        ok * 0.01,                                # peak below min_peak (0.05)
    ]
    pts, conf = DECODERS[name](np.stack(channels), DecoderConfig(min_peak=0.05))
    assert np.isfinite(pts[0]).all() and conf[0] > 0.9
    assert np.isnan(pts[1:]).all(), pts
    np.testing.assert_array_equal(conf[1:], 0.0)
    assert not (pts[1:] == 0).any()


def test_partial_nan_channel_still_decodes():
    hm = gaussian_heatmaps(np.array([[20.3, 30.6]]), (H, W), 2.0).astype(np.float64)
    hm[0, :5, :5] = np.nan
    for name in DECODERS:
        pts, _ = DECODERS[name](hm, DecoderConfig())
        assert np.linalg.norm(pts[0] - [20.3, 30.6]) < 0.5, name


@pytest.mark.parametrize("name", list(DECODERS))
def test_batched_decode_matches_per_image(name):
    rng = np.random.default_rng(11)
    truth = random_points(rng, 6, 3.0, 25.0).reshape(2, 3, 2)
    truth[1, 2] = np.nan
    maps = np.stack([gaussian_heatmaps(t, (H, W), 2.5) for t in truth])   # (2, 3, H, W)
    cfg = DecoderConfig(name=name)
    pts, conf = decode(maps, cfg)
    assert pts.shape == (2, 3, 2) and conf.shape == (2, 3)
    for b in range(2):
        p, c = decode(maps[b], cfg)
        np.testing.assert_array_equal(p, pts[b])
        np.testing.assert_array_equal(c, conf[b])
    assert np.isnan(pts[1, 2]).all() and conf[1, 2] == 0


def test_decode_accepts_torch_and_rejects_unknown_name():
    torch = pytest.importorskip("torch")
    maps = gaussian_heatmaps(np.array([[12.25, 9.75]]), (H, W), 2.0)
    pts, _ = decode(torch.from_numpy(maps)[None], DecoderConfig(name="parabola"))
    np.testing.assert_allclose(pts[0, 0], [12.25, 9.75], atol=1e-3)
    with pytest.raises(ValueError, match="unknown decoder"):
        decode(maps, DecoderConfig(name="nope"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(DECODERS))
def test_never_abstain_decodes_negative_peaks(name):
    """NEVER_ABSTAIN: a channel whose maximum is negative still gets its position; only the
    channels without location information (all NaN, constant) stay missing."""
    from ddpm_landmarks.heatmaps.decoders import NEVER_ABSTAIN, never_abstain
    blob = gaussian_heatmaps(np.array([[20.0, 30.0]]), (H, W), 2.0)[0]
    channels = np.stack([blob - 2.0,                    # max -1 at (20, 30)
                         np.full((H, W), np.nan), np.full((H, W), -3.0)])
    cfg = never_abstain(DecoderConfig(name=name))
    assert cfg.min_peak == NEVER_ABSTAIN
    pts, conf = DECODERS[name](channels, cfg)
    np.testing.assert_allclose(pts[0], [20.0, 30.0], atol=0.5)
    assert conf[0] == pytest.approx(-1.0)
    assert np.isnan(pts[1:]).all()
    # With min_peak 0 the same channel is a miss: "0" is not "never abstain".
    assert np.isnan(DECODERS[name](channels, DecoderConfig(name=name, min_peak=0.0))[0][0]).all()


def released_extract_landmarks(heatmaps: np.ndarray) -> np.ndarray:
    """The released code's `extract_landmarks` (downstream_task/utilities.py), without its
    final division by the grid size: pixel-centre (x, y) of each raw channel's largest blob
    at >= 0.5 x max; (0, 0) when there is none."""
    import cv2
    out = np.zeros((len(heatmaps), 2))
    for i, channel in enumerate(heatmaps):
        binary = np.where(channel < 0.5 * channel.max(), 0, 1).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if contours:
            m = cv2.moments(max(contours, key=cv2.contourArea))
            if m["m00"] != 0:
                out[i] = m["m10"] / m["m00"], m["m01"] / m["m00"]
    return out


def test_channel_ce_contour_is_the_released_rule_on_an_asymmetric_blob():
    """channel_ce logits: our outputs -> heatmaps -> contour equals the released code's
    extract_landmarks on the raw logits. A min-max rescale (cut at (min + max) / 2) moves the
    centroid of this asymmetric blob by more than half a grid pixel."""
    torch = pytest.importorskip("torch")
    from ddpm_landmarks.heatmaps.outputs import outputs_to_heatmaps
    yy, xx = np.mgrid[:H, :W].astype(np.float64)
    # A skewed blob: narrow to the left of x = 20, wide to the right, on a negative background.
    sx = np.where(xx < 20, 2.0, 7.0)
    logits = 6.0 * np.exp(-0.5 * (((xx - 20) / sx) ** 2 + ((yy - 30) / 3.0) ** 2)) - 4.0
    second = 3.0 * np.exp(-0.5 * (((xx - 45) / 4.0) ** 2 + ((yy - 12) / 2.0) ** 2)) - 1.0
    raw = np.stack([logits, second])
    released = released_extract_landmarks(raw)
    maps = outputs_to_heatmaps(torch.from_numpy(raw)[None].float(), "channel_ce")[0]
    ours, conf = DECODERS["contour"](maps, DecoderConfig(name="contour", contour_threshold=0.5))
    np.testing.assert_allclose(ours, released, atol=1e-4)
    np.testing.assert_allclose(conf, 1.0, atol=1e-6)
    lo, hi = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    min_max, _ = DECODERS["contour"]((raw - lo) / (hi - lo), DecoderConfig(name="contour"))
    assert np.linalg.norm(min_max[0] - released[0]) > 0.5
    # Every decoder is unchanged by the positive per-channel scale.
    for name in ("argmax", "parabola", "soft_argmax"):
        a, _ = DECODERS[name](maps.numpy(), DecoderConfig(name=name, min_peak=-np.inf))
        b, _ = DECODERS[name](raw, DecoderConfig(name=name, min_peak=-np.inf))
        np.testing.assert_allclose(a, b, atol=1e-4)
