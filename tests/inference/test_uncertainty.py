"""Uncertainty scales in the error unit, computed by hand, and their ranking report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ddpm_landmarks.evaluation.uncertainty_report import (
    format_uncertainty,
    ranking_quality,
    sparsification,
    uncertainty_summary,
    write_uncertainty,
)
from ddpm_landmarks.evaluation.wandb_log import uncertainty_values
from ddpm_landmarks.inference.calibration import file_unit_scale
from ddpm_landmarks.inference.two_stage import TwoStageOutput
from ddpm_landmarks.inference.uncertainty import (
    GridEstimates,
    score_scales,
    spread_in_unit,
    tta_in_unit,
    two_stage_scales,
)

# Model grid -> original: x 3 px per grid px, y 2 px, plus a shift; unit: 0.1 x 0.2 mm / px.
TO_ORIGINAL = np.array([[[3.0, 0.0, 5.0], [0.0, 2.0, -1.0], [0.0, 0.0, 1.0]]])
UNIT = np.array([[0.1, 0.2]])


def test_spread_is_the_covariance_mapped_to_mm():
    # C = diag(1, 4) grid px^2 -> D A C A^T D = diag((0.3)^2 * 1, (0.4)^2 * 4) = diag(0.09, 0.64)
    cov = np.diag([1.0, 4.0])[None, None]
    assert spread_in_unit(cov, TO_ORIGINAL, UNIT)[0, 0] == pytest.approx(math.sqrt(0.73))
    # Off-diagonal terms are carried: cov [[1, .5], [.5, 1]] under a 90-degree rotation keeps
    # its trace; the trace is what the RMS radius reads.
    rot = np.array([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    c2 = np.array([[[[1.0, 0.5], [0.5, 1.0]]]])
    assert spread_in_unit(c2, rot, np.ones((1, 2)))[0, 0] == pytest.approx(math.sqrt(2.0))
    # Per-landmark matrices (a two-stage predictor's patches): (B, K, 3, 3).
    per = np.stack([TO_ORIGINAL[0], np.eye(3)])[None]
    two = np.concatenate([cov, cov], axis=1)
    np.testing.assert_allclose(spread_in_unit(two, per, UNIT)[0],
                               [math.sqrt(0.73), math.sqrt(0.01 + 0.16)])


def test_tta_is_the_rms_scatter_of_the_mapped_back_views():
    # Two views 2 grid px apart in x: 6 original px = 0.6 mm; RMS distance to the mean 0.3 mm.
    views = np.array([[[[10.0, 7.0]]], [[[12.0, 7.0]]]])
    assert tta_in_unit(views, TO_ORIGINAL, UNIT)[0, 0] == pytest.approx(0.3)
    # Three views on a vertical line 1 grid px apart: y 2 px = 0.4 mm; RMS sqrt(2/3) x 0.4.
    views = np.array([[[[0.0, y]]] for y in (0.0, 1.0, 2.0)])
    assert tta_in_unit(views, TO_ORIGINAL, UNIT)[0, 0] == pytest.approx(0.4 * math.sqrt(2 / 3))


def test_score_scales_floor_and_unknown():
    grid = GridEstimates(points=np.zeros((1, 3, 2)), peak=np.array([[0.5, 0.0, -1.0]]),
                         covariance=np.stack([np.eye(2), np.zeros((2, 2)),
                                              np.full((2, 2), np.nan)])[None])
    s = score_scales(grid, np.eye(3)[None], np.ones((1, 2)), floor=1e-3)
    assert set(s) == {"none", "peak", "spread"}                  # no views: no tta
    np.testing.assert_array_equal(s["none"], [[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(s["peak"], [[2.0, 1e3, 1e3]])       # 1 / max(peak, floor)
    np.testing.assert_allclose(s["spread"], [[math.sqrt(2.0), 1e-3, np.nan]])


def test_two_stage_scales_read_the_heatmap_behind_each_final_point():
    """Landmark 0 refined: the patch map's covariance diag(4, 1) patch px^2 through the patch
    -> original matrix (0.5 original px per patch px) is diag(1, 0.25) px^2, in mm (0.1 x
    0.2 mm / px) diag(0.01, 0.01). Landmark 1 kept at stage 1: stage 1's diag(1, 4) grid px^2
    through TO_ORIGINAL, sqrt(0.73) mm as above. Peak: the final point's."""
    nan = np.full((2, 2), np.nan)
    patch = np.array([[0.5, 0.0, 40.0], [0.0, 0.5, 20.0], [0.0, 0.0, 1.0]])
    out = TwoStageOutput(
        stage1=np.zeros((1, 2, 2)), final=np.zeros((1, 2, 2)), stage1_peak=np.array([[0.2, 0.3]]),
        final_peak=np.array([[0.8, 0.3]]),
        patch_to_original=np.stack([patch, np.full((3, 3), np.nan)])[None],
        stage1_covariance=np.stack([np.diag([9.0, 9.0]), np.diag([1.0, 4.0])])[None],
        model_to_original=TO_ORIGINAL, patch_covariance=np.stack([np.diag([4.0, 1.0]), nan])[None])
    s = two_stage_scales(out, UNIT, floor=1e-3)
    np.testing.assert_allclose(s["spread"], [[math.sqrt(0.02), math.sqrt(0.73)]])
    np.testing.assert_allclose(s["peak"], [[1 / 0.8, 1 / 0.3]])
    assert "tta" not in s
    with pytest.raises(ValueError, match="spread settings"):
        two_stage_scales(TwoStageOutput(out.stage1, out.final, out.stage1_peak, out.final_peak),
                         UNIT, 1e-3)


def test_sparsification_and_auroc_by_hand():
    errors = np.array([1.0, 4.0, 2.0, 3.0])
    # Removing the most uncertain first: order 1 (4.0), 3 (3.0), 2, 0 -> the oracle here.
    order = np.array([1, 3, 2, 0])
    np.testing.assert_allclose(sparsification(errors, order, [0.0, 0.25, 0.5, 0.75]),
                               [2.5, 2.0, 1.5, 1.0])
    perfect = ranking_quality(errors[None], np.array([[1.0, 4.0, 2.0, 3.0]]), 2.5, 0.25)
    assert perfect["auroc"] == 1.0 and perfect["ause"] == pytest.approx(0.0)
    assert perfect["mre_rest"] == 2.0 and perfect["mre_drop_percent"] == pytest.approx(20.0)
    backwards = ranking_quality(errors[None], np.array([[4.0, 1.0, 3.0, 2.0]]), 2.5, 0.25)
    # ... removes the smallest error (1.0) first: the rest (4, 2, 3) is worse, -20 %.
    assert backwards["auroc"] == 0.0 and backwards["mre_rest"] == pytest.approx(3.0)
    assert backwards["mre_drop_percent"] == pytest.approx(-20.0)
    # A miss is a large error and is left out of every MRE; NaN (no ground truth) is dropped.
    # An unknown scale (NaN: flat heatmap) ranks as the least sure.
    with_miss = ranking_quality(np.array([[1.0, np.inf, np.nan, 2.0]]),
                                np.array([[1.0, np.nan, 9.0, 0.5]]), 2.5, 0.34)
    assert with_miss["pairs"] == 3 and with_miss["large_errors"] == 1
    assert with_miss["auroc"] == 1.0 and with_miss["mre_all"] == 1.5
    assert with_miss["mre_rest"] == 1.5                        # the miss went first


def test_summary_files_and_table(tmp_path):
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 3.0, size=(40, 2))
    errors = sigma * np.sqrt(rng.chisquare(2, size=(40, 2)))
    radii = {"spread": {0.1: 2.0 * sigma, 0.05: np.full((40, 2), np.inf)}}
    report = uncertainty_summary(errors, {"none": np.ones_like(sigma), "spread": sigma}, radii,
                                 threshold=2.0, flag_radius=2.0, primary="spread")
    assert set(report["ranking"]) == {"spread"}                    # a constant ranks nothing
    q = report["regions"]["spread"]
    assert q[0.05]["overall"] == 1.0 and q[0.05]["infinite"] == 80
    assert q[0.1]["overall"] == pytest.approx(np.mean(errors <= 2.0 * sigma))
    assert q[0.1]["flagged"] == pytest.approx(np.mean(2.0 * sigma > 2.0))
    assert report["ranking"]["spread"]["auroc"] > 0.6                # sigma ranks the errors
    paths = write_uncertainty(tmp_path, report, ["a", "b"])
    data = json.loads(paths["uncertainty"].read_text())
    assert data["regions"]["spread"]["0.05"]["mean_radius"] is None  # all infinite: no mean
    assert (tmp_path / "sparsification.png").stat().st_size > 1000
    lines = paths["coverage"].read_text().splitlines()
    assert lines[0] == "landmark_index,name,coverage_spread@0.1,coverage_spread@0.05"
    assert len(lines) == 3
    text = format_uncertainty(report)
    assert "| spread (used) | 0.1 |" in text and "| spread | " in text


def test_file_units_and_logged_numbers():
    # predict: a file is its own original grid; px@WxH scales by reference / file size.
    assert file_unit_scale("px", (300, 200), None) == (1.0, 1.0)
    assert file_unit_scale("px@512x512", (256, 1024), None) == (2.0, 0.5)
    assert file_unit_scale("mm", (300, 200), None) is None
    assert file_unit_scale("mm", (300, 200), (0.1, 0.2)) == (0.1, 0.2)
    report = uncertainty_summary(np.array([[1.0, 3.0]]), {"spread": np.array([[1.0, 2.0]])},
                                 {"spread": {0.1: np.array([[2.0, 2.0]])}}, threshold=2.0,
                                 flag_radius=2.5, primary="spread")
    assert uncertainty_values(report) == {"auroc_spread": 1.0, "mre_drop_spread": 0.0,
                                          "coverage@0.1": 0.5, "mean_radius@0.1": 2.0}
