"""The released code's scoring convention (evaluation/released_convention.py), by hand, and
through `ddpm-landmarks evaluate --convention released`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpm_landmarks.evaluation.released_convention import (
    disc,
    extract_point,
    released_errors,
    released_truth,
    to_released_grid,
)

W, H = 1935, 2400                                  # an ISBI image: 1935 wide, 2400 high


def test_points_go_to_the_256_grid_rounded_half_to_even():
    # x / W * 256: 2.5 -> 2 and 3.5 -> 4 (Python's round), NaN (a miss) -> (0, 0)
    pts = np.array([[2.5 * W / 256, 3.5 * H / 256], [1000.0, 1200.0], [np.nan, np.nan]])
    assert to_released_grid(pts, (W, H)).tolist() == [[2, 4], [132, 128], [0, 0]]


def test_target_disc_and_its_re_extraction():
    assert disc((128, 128)).sum() == 109            # sigma 5 at half maximum: d^2 <= 34
    assert extract_point(disc((100, 50))).tolist() == [100, 50]
    # A disc cut by the grid's corner: its largest contour's centroid moves inwards.
    assert extract_point(disc((0, 0))).tolist() == [2, 2]
    assert extract_point(np.zeros((256, 256), np.uint8)).tolist() == [0, 0]   # nothing found


def test_isbi_spacing_is_swapped_as_released():
    """One grid pixel of x error costs 2400/256 x 0.1 = 0.9375 mm there (ours: W/256 px x
    0.1 mm = 0.756 mm); one of y error 1935/256 x 0.1 = 0.7559 mm (ours: 0.9375)."""
    gt = np.array([[[967.0, 1200.0], [967.0, 1200.0]]])          # grid (128, 128)
    pred = gt + np.array([[W / 256, 0.0], [0.0, H / 256]])       # one grid pixel in x, in y
    errors, unit = released_errors(pred, gt, [(W, H)], "isbi2015")
    assert errors[0].tolist() == pytest.approx([0.9375, 1935 / 256 * 0.1])
    assert "swapped" in unit


def test_misses_are_scored_at_the_origin_and_missing_truth_is_left_out():
    gt = np.array([[[967.0, 1200.0], [np.nan, np.nan]]])
    pred = np.full((1, 2, 2), np.nan)
    errors, _ = released_errors(pred, gt, [(W, H)], "isbi2015")
    assert errors[0, 0] == pytest.approx(np.hypot(128 * 0.9375, 128 * 1935 / 256 * 0.1))
    assert np.isnan(errors[0, 1])


def test_hand_uses_landmarks_0_and_4_and_chest_grid_pixels():
    size = (1000, 1000)
    gt = np.full((1, 37, 2), 500.0)
    gt[0, 0], gt[0, 4] = (100.0, 500.0), (300.0, 500.0)           # grid x 25.6 -> 26, 76.8 -> 77
    pred = gt.copy()
    pred[0, 10, 0] += 10 * 1000 / 256                                 # 10 grid pixels in x
    errors, unit = released_errors(pred, gt, [size], "hand_dha")
    assert errors[0, 10] == pytest.approx(10 * 50 / 51) and "0-4" in unit
    chest = np.array([[[100.0, 100.0]] * 6])
    moved = chest + np.array([3 * 512 / 256, 4 * 512 / 256])       # (3, 4) grid pixels
    errors, unit = released_errors(moved, chest, [(512, 512)], "chest_gu2net")
    assert errors[0].tolist() == pytest.approx([5.0] * 6) and unit.startswith("px@256x256")
    with pytest.raises(ValueError, match="defined for isbi2015, hand_dha and chest_gu2net"):
        released_errors(chest, chest, [(512, 512)], "aasce_spine")


def test_released_truth_marks_our_missing_points():
    truth = released_truth(np.array([[10.0, 20.0], [np.nan, 5.0]]), (256, 256))
    assert truth[0].tolist() == [10, 20] and np.isnan(truth[1]).all()


def test_evaluate_command_scores_both_ways(shared_data, tmp_path, torch_one_thread):
    """`evaluate --convention released` on ISBI Test1 (a random tiny model at 64 px): its own
    folder, labelled, the same predictions as our convention, errors recomputed by hand."""
    from ddpm_landmarks.cli.main import main
    from ddpm_landmarks.config.finetune import FinetuneConfig
    from ddpm_landmarks.config.schema import load_config, save_config, to_dict
    from ddpm_landmarks.models.registry import build_regressor
    from ddpm_landmarks.models.saved_regressor import save_regressor

    cfg = load_config(None, [f"data.root={shared_data / 'isbi2015'}", "data.dataset=isbi2015",
                             "data.image_size=64", "model.init=scratch", "model.pretrained_path=",
                             "model.preset=tiny", "decoder.min_peak=0", "logger.kind=none"],
                      cls=FinetuneConfig)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    save_regressor(build_regressor(cfg.model, 19, 64), run_dir / "export", config=to_dict(cfg))
    assert main(["evaluate", str(run_dir), "--split", "test1", "--device", "cpu"]) == 0
    assert main(["evaluate", str(run_dir), "--split", "test1", "--device", "cpu",
                 "--convention", "released"]) == 0
    ours = json.loads((run_dir / "eval_test1" / "metrics.json").read_text())
    released = json.loads((run_dir / "eval_test1_released" / "metrics.json").read_text())
    assert released["convention"] == "released" and "convention" not in ours
    assert released["thresholds"] == [2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0]
    assert released["n"] == ours["n"] == 150 * 19

    def rows(folder):
        import csv
        with open(run_dir / folder / "predictions.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    a, b = rows("eval_test1"), rows("eval_test1_released")
    assert [(r["x_pred"], r["y_pred"]) for r in a] == [(r["x_pred"], r["y_pred"]) for r in b]
    first = [r for r in b if r["image"] == b[0]["image"]]
    pred = np.array([[[float(r["x_pred"] or "nan"), float(r["y_pred"] or "nan")] for r in first]])
    gt = np.array([[[float(r["x_gt"]), float(r["y_gt"])] for r in first]])
    errors, _ = released_errors(pred, gt, [(W, H)], "isbi2015")
    assert [float(r["error"]) for r in first] == pytest.approx(errors[0].tolist())
