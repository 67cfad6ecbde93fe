"""Paired comparison of two inits in a grid folder (hand-made cells and predictions): pairs by
budget, seed and stage; per-seed mean differences and their t interval; verdicts; the
refinement rows (final vs stage 1); the CLI."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.studies.paired_comparison import compare_grid, per_image_errors
from ddpm_landmarks.studies.paired_stats import t_quantile

IMAGES = 20


def write_predictions(folder: Path, errors: np.ndarray) -> None:
    """predictions.csv with 2 landmarks per image whose mean is errors[i]."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "landmark_index", "name", "x_pred", "y_pred", "x_gt", "y_gt",
                    "error", "unit"])
        for i, e in enumerate(errors):
            w.writerow([f"im{i}", 0, "a", 0, 0, 0, 0, repr(float(e) - 0.1), "mm"])
            w.writerow([f"im{i}", 1, "b", 0, 0, 0, 0, repr(float(e) + 0.1), "mm"])


def write_cell(grid: Path, init: str, seed: int, final: np.ndarray, stage1: np.ndarray):
    d = grid / "cells" / f"ds-{init}-N10-s{seed}"
    write_predictions(d / "refine" / "eval_test1", final)
    write_predictions(d / "refine" / "eval_test1" / "stage1", stage1)
    metrics = {"unit": "mm", "mre": float(final.mean()), "thresholds": [2.0]}
    (d / "cell.json").write_text(json.dumps({
        "dataset": "ds", "init": init, "budget": 10, "budget_label": "10", "seed": seed,
        "status": "done", "name": d.name, "run_dir": str(d), "eval_split": "test1",
        "eval_dir": str(d / "refine" / "eval_test1"), "metrics": metrics,
        "stage1_metrics": {**metrics, "mre": float(stage1.mean())}}))


def write_one_stage_cell(grid: Path, init: str, seed: int, errors: np.ndarray):
    d = grid / "cells" / f"ds-{init}-N10-s{seed}"
    write_predictions(d / "eval_test1", errors)
    (d / "cell.json").write_text(json.dumps({
        "dataset": "ds", "init": init, "budget": 10, "budget_label": "10", "seed": seed,
        "status": "done", "name": d.name, "run_dir": str(d), "eval_split": "test1",
        "metrics": {"unit": "mm", "mre": float(errors.mean()), "thresholds": [2.0]}}))


@pytest.fixture()
def grid(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.uniform(1.5, 2.5, IMAGES)
    for seed, shift in enumerate([0.30, 0.25, 0.35]):      # a better than b by ~0.3 mm
        b = base + rng.normal(0, 0.05, IMAGES)
        a = b - shift
        write_cell(tmp_path, "a", seed, final=a, stage1=a + 0.5)
        write_cell(tmp_path, "b", seed, final=b, stage1=b + rng.normal(0, 0.05, IMAGES))
    return tmp_path


def test_per_image_errors_skip_misses(tmp_path):
    write_predictions(tmp_path, np.array([1.0, 2.0]))
    assert per_image_errors(tmp_path) == pytest.approx({"im0": 1.0, "im1": 2.0})
    text = (tmp_path / "predictions.csv").read_text().replace(repr(2.0 + 0.1), "inf")
    (tmp_path / "predictions.csv").write_text(text)
    assert per_image_errors(tmp_path)["im1"] == pytest.approx(1.9)


def test_compare_grid(grid):
    result = compare_grid(grid, "a", "b")
    rows = {r["label"]: r for r in result["inits"]}
    final = rows["final"]
    assert final["seeds"] == [0, 1, 2]
    assert [x["mean_diff"] for x in final["per_seed"]] == pytest.approx([-0.30, -0.25, -0.35])
    half = t_quantile(0.975, 2) * 0.05 / math.sqrt(3)                # SD of the three = 0.05
    assert (final["mean_diff"], final["t_low"], final["t_high"]) == \
        pytest.approx((-0.30, -0.30 - half, -0.30 + half))
    assert final["verdict"] == "a better"
    assert all(x["wilcoxon_p"] < 1e-3 for x in final["per_seed"])   # 20 of 20 images better
    assert rows["stage 1"]["verdict"] in ("not resolved", "b better")
    refine = {r["label"]: r for r in result["refine"]}
    assert refine["a"]["mean_diff"] == pytest.approx(-0.5) and refine["a"]["verdict"] == \
        "final better"
    assert refine["b"]["verdict"] == "not resolved"


def test_compare_cli(grid, capsys):
    assert cli_main(["compare", str(grid), "--a", "a", "--b", "b"]) == 0
    out = capsys.readouterr().out
    assert "| ds | 10 | final | 3 |" in out and "a better" in out
    assert (grid / "report" / "compare_a_vs_b.csv").is_file()
    assert cli_main(["compare", str(grid), "--a", "x", "--b", "y"]) == 2


def test_a_one_stage_init_is_compared_with_the_others_stage_1(grid):
    """An init run without refinement (one-stage cells) beside two-stage cells: its points are
    stage-1 points, paired with the other init's stage 1, never with its final points."""
    stage1_of_b = {s: per_image_errors(grid / "cells" / f"ds-b-N10-s{s}" / "refine" /
                                       "eval_test1" / "stage1") for s in range(3)}
    for seed in range(3):
        errors = np.array([stage1_of_b[seed][f"im{i}"] for i in range(IMAGES)]) - 0.2
        write_one_stage_cell(grid, "c", seed, errors)
    rows = {r["label"]: r for r in compare_grid(grid, "c", "b")["inits"]}
    assert set(rows) == {"stage 1"}
    assert [x["mean_diff"] for x in rows["stage 1"]["per_seed"]] == pytest.approx([-0.2] * 3)
    assert rows["stage 1"]["verdict"] == "c better"


def test_one_stage_grids_keep_their_unnamed_stage(tmp_path):
    rng = np.random.default_rng(1)
    for seed in range(3):
        b = rng.uniform(1.5, 2.5, IMAGES)
        write_one_stage_cell(tmp_path, "a", seed, b - 0.1)
        write_one_stage_cell(tmp_path, "b", seed, b)
    rows = compare_grid(tmp_path, "a", "b")["inits"]
    assert [r["label"] for r in rows] == [""]
    assert rows[0]["mean_diff"] == pytest.approx(-0.1) and rows[0]["verdict"] == "a better"
