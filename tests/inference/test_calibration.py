"""`calibrate`, then `evaluate` and `predict` with the calibration, on a tiny trained model.

References: the per-landmark quantile recomputed from predictions of the existing predictor
path (predict_dataset, radial_errors); evaluate's radii = q x the score column it writes;
predict's radii for the same files equal evaluate's; points never move with scores.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddpm_landmarks.cli.main import main
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import load_split
from ddpm_landmarks.evaluation.metrics import radial_errors
from ddpm_landmarks.inference.calibration import load_calibration
from ddpm_landmarks.inference.predict import read_predictions_csv
from ddpm_landmarks.inference.predictor import predict_dataset
from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run

K = 4
SPACING = 0.5            # synthetic mm per pixel; the files are their own original grids


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, torch_one_thread):
    """36 synthetic images (24 train, 12 test1): 8 labels + 4 validation, 12 left to calibrate.
    Fine-tuning ends with the calibration (uncertainty.calibrate_after_training)."""
    from ddpm_landmarks.finetune import finetune

    tmp = tmp_path_factory.mktemp("calibration_run")
    cfg = load_config(Path(__file__).parents[2] / "configs" / "finetune" / "synthetic.yaml", [
        f"data.root={tmp / 'syn'}", "data.synthetic_num_images=36",
        "data.synthetic_image_size=64", f"data.synthetic_num_landmarks={K}",
        "data.image_size=32", "fewshot.budget=8", "fewshot.val_count=4", "model.init=scratch",
        "model.pretrained_path=", "model.preset=tiny", "train.max_steps=40",
        "train.num_workers=0", "train.eval_every=0", "train.checkpoint_every=1000",
        "train.batch_size=4", "optim.warmup_steps=5", "optim.lr=0.002", "logger.kind=none",
        "heatmap.sigma=1.5", "eval.overlays=1", "uncertainty.calibrate_after_training=true",
        f"run.output_dir={tmp / 'runs'}", "run.name=syn"], cls=FinetuneConfig)
    finetune(cfg)
    return tmp / "runs" / "syn"


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def column(rows, name):
    return np.array([float(r[name]) if r[name] != "" else np.nan for r in rows]).reshape(-1, K)


def test_finetune_calibrates_unseen_training_images(run_dir):
    cal = load_calibration(run_dir)
    split = load_split(run_dir)
    assert len(cal.ids) == 12 and not set(cal.ids) & set(split.train_ids + split.val_ids)
    dataset = build_dataset(load_config(run_dir / "config.yaml", cls=FinetuneConfig).data)
    assert set(cal.ids) <= set(dataset.split("train").ids)
    assert (run_dir / "calibration_ids.txt").read_text().split() == cal.ids
    assert cal.unit == "mm" and cal.score == "spread" and cal.counts == [12] * K
    assert set(cal.quantiles) == {"none", "peak", "spread"} and cal.tta_views == 0
    # n = 12: alpha 0.05 needs n >= 19, so its radii are infinite, stated as such.
    assert np.isinf(cal.quantiles["spread"][0.05]).all()
    assert np.isfinite(cal.quantiles["spread"][0.1]).all()
    raw = json.loads((run_dir / "calibration.json").read_text())
    assert raw["format"] == "ddpm_landmarks.calibration" and raw["quantiles"]["none"]["0.05"] \
        == ["inf"] * K
    assert raw["uncertainty"]["flag_radius"] == 1.0           # synthetic: smallest SDR, 1 mm


def test_plain_quantile_is_the_rank_statistic_of_the_calibration_errors(run_dir):
    """q_none(0.1) with n = 12 is the ceil(13 x 0.9) = 12th smallest error: the largest, per
    landmark, computed here through the ordinary predictor path."""
    run = load_trained_run(run_dir, device="cpu")
    cal = load_calibration(run_dir)
    images = build_dataset(run.cfg.data).split("train").subset(cal.ids)
    data = HeatmapDataset(images, run.cfg.data, run.cfg.augment, run.cfg.heatmap, train=False)
    _, points, _ = predict_dataset(run.predictor(images.flip_permutation), data)
    gt = np.stack([r.landmarks for r in images.records])
    errors = radial_errors(points, gt, SPACING)
    np.testing.assert_allclose(cal.quantiles["none"][0.1], errors.max(axis=0), rtol=1e-6)


def test_evaluate_reports_coverage_radii_and_keeps_the_points(run_dir, tmp_path):
    run = load_trained_run(run_dir, device="cpu")
    cal = load_calibration(run_dir)
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    rows = read_rows(tmp_path / "eval" / "predictions.csv")
    spread, radius = column(rows, "uncertainty_spread"), column(rows, "radius@0.1")
    np.testing.assert_allclose(radius, cal.quantiles["spread"][0.1] * spread, rtol=1e-12)
    assert all(r["radius@0.05"] == "inf" and r["flag@0.05"] == "1" for r in rows)
    np.testing.assert_array_equal(column(rows, "flag@0.1"), (radius > 1.0).astype(int))
    report = json.loads((tmp_path / "eval" / "uncertainty.json").read_text())
    errors = column(rows, "error")
    cover = report["regions"]["spread"]["0.1"]
    assert cover["overall"] == pytest.approx(np.mean(errors <= radius))
    assert cover["per_landmark"] == pytest.approx(list(np.mean(errors <= radius, axis=0)))
    assert report["regions"]["spread"]["0.05"]["overall"] == 1.0
    assert set(report["ranking"]) == {"peak", "spread"} and report["primary"] == "spread"
    assert (tmp_path / "eval" / "sparsification.png").is_file()
    assert (tmp_path / "eval" / "coverage_per_landmark.csv").is_file()
    # The calibration changes no point: the same run without it predicts the same points.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("calibration*", "eval_*"))
    plain = evaluate_run(load_trained_run(bare, device="cpu"), "test1", tmp_path / "eval2")
    np.testing.assert_array_equal(plain["predictions"], summary["predictions"])
    assert "radius@0.1" not in read_rows(tmp_path / "eval2" / "predictions.csv")[0]
    assert plain["uncertainty"]["regions"] == {}


def test_calibration_for_other_decoding_is_not_used(run_dir, tmp_path, caplog):
    run = load_trained_run(run_dir, overrides=["decoder.name=argmax"], device="cpu")
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    assert summary["radii"] is None and "another decoder" in caplog.text


def test_predict_writes_the_same_radii_as_evaluate(run_dir, tmp_path):
    run = load_trained_run(run_dir, device="cpu")
    test = build_dataset(run.cfg.data).split("test1")
    folder = tmp_path / "images"
    folder.mkdir()
    for r in test.records[:3]:
        shutil.copy(r.image_path, folder / Path(r.image_path).name)
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    expected = summary["radii"]["spread"][0.1][:3]

    out_mm = tmp_path / "mm.csv"
    argv = ["predict", str(run_dir), "--images", str(folder), "--device", "cpu"]
    assert main(argv + ["--out", str(out_mm), "--spacing", str(SPACING),
                        "--overlay", str(tmp_path / "ov")]) == 0
    out_px = tmp_path / "px.csv"
    assert main(argv + ["--out", str(out_px)]) == 0
    mm, px = read_predictions_csv(out_mm), read_predictions_csv(out_px)
    for i, r in enumerate(test.records[:3]):
        name = Path(r.image_path).name
        assert mm[name]["radius_unit"] == "mm" and px[name]["radius_unit"] == "px"
        # Batches of other composition: float32 last bits (cf. POINT_ATOL of test_predict).
        np.testing.assert_allclose(mm[name]["radius"][0.1], expected[i], rtol=1e-3)
        np.testing.assert_allclose(px[name]["radius"][0.1], expected[i] / SPACING, rtol=1e-3)
        assert np.isinf(mm[name]["radius"][0.05]).all()
        np.testing.assert_array_equal(mm[name]["flag"][0.1], expected[i] > 1.0)
        assert (px[name]["flag"][0.1] == -1).all()            # mm threshold, px radius
    assert len(list((tmp_path / "ov").glob("*.png"))) == 3


def test_cli_calibrate_with_tta_and_a_count(run_dir, tmp_path, capsys):
    """A second calibration (count, seed, tta) replaces the first; evaluate then computes the
    tta score with the calibration's own settings, without being asked."""
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    assert main(["calibrate", str(work), "--count", "10", "--seed", "3", "--score", "tta",
                 "--alphas", "0.1", "--device", "cpu", "uncertainty.tta_jitters=2"]) == 0
    out = capsys.readouterr().out
    assert "| tta (used) | 0.1 |" in out and "calibration on 10 images" in out
    cal = load_calibration(work)
    assert len(cal.ids) == 10 and set(cal.ids) <= set(load_calibration(run_dir).ids)
    assert cal.tta_views == 4 and cal.alphas == [0.1]         # identity + 2 jitters + mirror
    summary = evaluate_run(load_trained_run(work, device="cpu"), "test1", tmp_path / "eval")
    assert set(summary["radii"]) == {"none", "peak", "spread", "tta"}
    assert np.isfinite(summary["scales"]["tta"]).all()
    assert main(["calibrate", str(work), "--count", "13", "--device", "cpu"]) == 2
    assert "13 is larger than the 12" in capsys.readouterr().err


def test_smp_run_on_a_pixel_unit_dataset(run_dir, tmp_path):
    """Another init (an untrained smp U-Net) on another reader and unit: the synthetic files
    read as a `generic` dataset without spacing, so errors and radii are in pixels, and
    predict's radii are in the files' pixels with flags (no spacing needed)."""
    from ddpm_landmarks.config.common import FewShotConfig
    from ddpm_landmarks.config.schema import save_config, to_dict
    from ddpm_landmarks.data.splits import make_fewshot_split, save_split
    from ddpm_landmarks.models.registry import build_regressor
    from ddpm_landmarks.models.saved_regressor import save_regressor

    source = run_dir.parent.parent / "syn"
    data = tmp_path / "generic"
    shutil.copytree(source, data)
    rows = (data / "manifest.csv").read_text().splitlines()
    (data / "manifest.csv").write_text("\n".join(
        ["image,split"] + [f"{r.split(',')[0]},{r.split(',')[2]}" for r in rows[1:]]) + "\n")
    cfg = load_config(None, [
        "data.dataset=generic", f"data.root={data}", "data.image_size=32", "model.arch=smp_unet",
        "model.init=scratch", "model.encoder=resnet18", "decoder.min_peak=-1000.0",
        "uncertainty.flag_radius=3.0", "eval.overlays=0"], cls=FinetuneConfig)
    work = tmp_path / "run"
    work.mkdir()
    save_config(cfg, work / "config.yaml")
    pool = build_dataset(cfg.data).split("train")
    assert pool.unit == "px"
    save_split(make_fewshot_split(pool.ids, FewShotConfig(budget=8, val_count=4)), work)
    save_regressor(build_regressor(cfg.model, K, 32), work / "export", config=to_dict(cfg))

    assert main(["calibrate", str(work), "--device", "cpu"]) == 0
    cal = load_calibration(work)
    assert cal.unit == "px" and len(cal.ids) == 12
    summary = evaluate_run(load_trained_run(work, device="cpu"), "test1", tmp_path / "eval")
    assert summary["unit"] == "px" and 0.0 <= summary["uncertainty"]["regions"]["spread"][0.1][
        "overall"] <= 1.0
    folder = tmp_path / "images"
    folder.mkdir()
    first = build_dataset(cfg.data).split("test1").records[0]
    shutil.copy(first.image_path, folder / "a.png")
    assert main(["predict", str(work), "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    got = read_predictions_csv(tmp_path / "p.csv")["a.png"]
    assert got["radius_unit"] == "px"
    np.testing.assert_allclose(got["radius"][0.1], summary["radii"]["spread"][0.1][0], rtol=1e-3)
    np.testing.assert_array_equal(got["flag"][0.1], got["radius"][0.1] > 3.0)
