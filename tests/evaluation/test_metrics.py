"""Radial errors, summary statistics, units and result files against hand-computed values."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddpm_landmarks.data.sample import LandmarkDataset, LandmarkSample, Record
from ddpm_landmarks.evaluation.metrics import (
    measurement_scale,
    per_landmark_table,
    radial_errors,
    summarize,
    write_results,
)

THRESHOLDS = [2.0, 2.5, 3.0, 4.0]


def hand_example():
    """2 images x 2 landmarks, spacing 1 mm, errors written out by hand.

    Offsets are exact in binary floating point so that errors land EXACTLY on the 2.0 and 2.5
    thresholds (1.2-1.6-2.0 would give 1.9999999999999998 after the subtraction).
    """
    gt = np.array([[[10.0, 10.0], [20.0, 20.0]],
                   [[30.0, 30.0], [40.0, 40.0]]])
    pred = gt + np.array([[[-2.0, 0.0], [0.0, 2.5]],    # 2.0, 2.5
                          [[3.0, 4.0], [0.0, -1.0]]])   # 5.0 (3-4-5 triangle), 1.0
    return pred, gt, np.ones((2, 2))


def test_hand_computed_summary():
    pred, gt, scale = hand_example()
    errors = radial_errors(pred, gt, scale)
    np.testing.assert_allclose(errors, [[2.0, 2.5], [5.0, 1.0]])
    s = summarize(errors, THRESHOLDS)
    # MRE = (2 + 2.5 + 5 + 1) / 4 = 2.625; SD (ddof=0) = sqrt(mean of squared deviations)
    assert s["mre"] == pytest.approx(2.625)
    var = ((2 - 2.625) ** 2 + (2.5 - 2.625) ** 2 + (5 - 2.625) ** 2 + (1 - 2.625) ** 2) / 4
    assert s["sd"] == pytest.approx(math.sqrt(var))          # = 1.4956...
    assert s["median"] == pytest.approx(2.25)
    # <= : 2.0 counts at 2.0 and 2.5 counts at 2.5
    assert s["sdr"] == pytest.approx({2.0: 50.0, 2.5: 75.0, 3.0: 75.0, 4.0: 75.0})
    assert s["n"] == 4 and s["missed"] == 0
    strict = summarize(errors, THRESHOLDS, inclusive=False)
    assert strict["sdr"] == pytest.approx({2.0: 25.0, 2.5: 50.0, 3.0: 75.0, 4.0: 75.0})


def test_anisotropic_spacing_multiplies_matching_axis():
    gt = np.zeros((1, 1, 2))
    pred = np.array([[[3.0, 4.0]]])                # dx = 3, dy = 4
    e = radial_errors(pred, gt, np.array([[0.1, 0.2]]))   # sx = 0.1, sy = 0.2
    assert e[0, 0] == pytest.approx(math.hypot(0.3, 0.8))
    swapped = radial_errors(pred, gt, np.array([[0.2, 0.1]]))
    assert swapped[0, 0] == pytest.approx(math.hypot(0.6, 0.4))
    assert abs(e[0, 0] - swapped[0, 0]) > 0.1     # a swap would be detected
    # One (2,) scale is broadcast to every image.
    assert radial_errors(pred, gt, [0.1, 0.2])[0, 0] == pytest.approx(e[0, 0])


def test_missing_ground_truth_excluded_and_missed_prediction_fails():
    pred, gt, scale = hand_example()
    gt[0, 1] = np.nan                              # not evaluated (was the 2.5 error)
    pred[1, 1] = np.nan                            # miss (was the 1.0 error)
    errors = radial_errors(pred, gt, scale)
    assert np.isnan(errors[0, 1]) and np.isinf(errors[1, 1])
    s = summarize(errors, THRESHOLDS)
    assert s["n"] == 3 and s["missed"] == 1
    assert s["mre"] == pytest.approx(3.5)          # over the predicted points 2.0 and 5.0
    assert s["sd"] == pytest.approx(1.5)
    # SDR over n = 3 with the miss counted as not detected even at the largest threshold.
    assert s["sdr"][2.0] == pytest.approx(100 / 3)
    assert s["sdr"][4.0] == pytest.approx(100 / 3)


def test_empty_summary_is_nan():
    s = summarize(np.full((2, 2), np.nan), THRESHOLDS)
    assert s["n"] == 0 and math.isnan(s["mre"]) and math.isnan(s["sdr"][2.0])


def test_per_landmark_table():
    pred, gt, scale = hand_example()
    rows = per_landmark_table(radial_errors(pred, gt, scale), ["sella", "nasion"], THRESHOLDS)
    assert [r["name"] for r in rows] == ["sella", "nasion"]
    assert rows[0]["landmark_index"] == 0
    assert rows[0]["mre"] == pytest.approx(3.5) and rows[0]["sd"] == pytest.approx(1.5)
    assert rows[1]["mre"] == pytest.approx(1.75) and rows[1]["sd"] == pytest.approx(0.75)
    assert rows[0]["sdr@2"] == 50.0 and rows[1]["sdr@2.5"] == 100.0 and rows[1]["sdr@2"] == 50.0


# ---------------------------------------------------------------------------- units

def make_dataset(unit, reference_size=None, records=None):
    records = records or [Record("a", Path("a.png"), np.zeros((1, 2)), spacing_mm=(0.1, 0.2),
                                 original_size=(1935, 2400))]
    return LandmarkDataset("toy", records, 1, unit=unit, reference_size=reference_size,
                           image_loader=lambda p: np.zeros((4, 4), np.float32))


def test_measurement_scale_units():
    ds = make_dataset("mm")
    assert measurement_scale(ds, ds.records[0]) == ((0.1, 0.2), "mm")
    ds = make_dataset("px")
    assert measurement_scale(ds, ds.records[0]) == ((1.0, 1.0), "px")
    ds = make_dataset("px@512x512", reference_size=(512, 512))
    (sx, sy), unit = measurement_scale(ds, ds.records[0])
    assert unit == "px@512x512"
    assert sx == pytest.approx(512 / 1935) and sy == pytest.approx(512 / 2400)


def test_measurement_scale_errors_and_samples():
    no_spacing = Record("b17", Path("b.png"), np.zeros((1, 2)))
    ds = make_dataset("mm", records=[no_spacing])
    with pytest.raises(ValueError, match="b17"):
        measurement_scale(ds, no_spacing)
    ds = make_dataset("px@512x512", reference_size=(512, 512), records=[no_spacing])
    with pytest.raises(ValueError, match="sample"):
        measurement_scale(ds, no_spacing)
    # The loaded sample always knows its original size (here the 4x4 stored image).
    sample = ds[0]
    assert isinstance(sample, LandmarkSample)
    assert measurement_scale(ds, sample) == ((128.0, 128.0), "px@512x512")
    # Any object with the attributes works.
    obj = SimpleNamespace(id="x", spacing_mm=(0.5, 0.25), original_size=None)
    assert measurement_scale(make_dataset("mm"), obj) == ((0.5, 0.25), "mm")


# ---------------------------------------------------------------------------- files

def test_write_results_round_trip(tmp_path):
    pred, gt, scale = hand_example()
    pred[1, 1] = np.nan                             # a miss
    gt[0, 1] = np.nan                               # no ground truth
    pred[0, 0] += 1e-9                              # full precision must survive
    errors = radial_errors(pred, gt, scale)
    summary = summarize(errors, THRESHOLDS)
    names = ["sella", "nasion"]
    paths = write_results(tmp_path / "eval", ["img1", "img2"], names, pred, gt, errors,
                          summary, "mm")
    assert {p.name for p in paths.values()} == {"metrics.json", "per_landmark.csv",
                                                "predictions.csv"}
    assert not list((tmp_path / "eval").glob(".*.tmp"))

    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["unit"] == "mm" and metrics["n"] == 3 and metrics["missed"] == 1
    assert metrics["mre"] == pytest.approx(summary["mre"])
    assert metrics["sdr"]["2.5"] == pytest.approx(summary["sdr"][2.5])
    assert metrics["per_landmark"][1]["name"] == "nasion"
    assert metrics["per_landmark"][1]["mre"] is None          # no predicted point: null

    with open(paths["per_landmark"]) as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["name"] == "sella" and float(rows[0]["mre"]) == pytest.approx(3.5)
    assert rows[1]["missed"] == "1" and rows[1]["mre"] == ""

    with open(paths["predictions"]) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "landmark_index", "name", "x_pred", "y_pred", "x_gt",
                             "y_gt", "error", "unit"]
    assert len(rows) == 4
    assert (rows[0]["image"], rows[0]["landmark_index"], rows[0]["name"]) == ("img1", "0", "sella")
    assert float(rows[0]["x_pred"]) == pred[0, 0, 0]           # not rounded
    assert float(rows[0]["error"]) == errors[0, 0]
    assert rows[1]["x_gt"] == "" and rows[1]["error"] == ""    # no ground truth
    assert rows[3]["x_pred"] == "" and float(rows[3]["error"]) == math.inf   # the miss
    assert all(r["unit"] == "mm" for r in rows)
