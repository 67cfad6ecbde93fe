"""`ddpm-landmarks predict`: unlabelled images -> landmarks in each file's own pixels.

The reference is `evaluate`: for the same image file, predict must report exactly the points
evaluate scored (after mapping file pixels -> original pixels where the file is a resized copy).
"""
import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ddpm_landmarks.cli.main import main
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config, save_config, to_dict
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import stored_to_original
from ddpm_landmarks.evaluation.metrics import radial_errors
from ddpm_landmarks.inference.predict import (
    CSV_HEADER,
    predict_folder,
    read_predictions_csv,
    to_model_grid,
)
from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.saved_regressor import save_regressor

NUM_LANDMARKS = 6


def read_csv(path):
    """{image: rows sorted by landmark_index} straight from the file (no package helper)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_HEADER
        out = {}
        for row in reader:
            out.setdefault(row["image"], []).append(row)
    return {k: sorted(v, key=lambda r: int(r["landmark_index"])) for k, v in out.items()}


def points_of(rows):
    return np.array([[float(r["x"]) if r["x"] else np.nan, float(r["y"]) if r["y"] else np.nan]
                     for r in rows])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, torch_one_thread):
    """A tiny run fine-tuned from scratch for 30 steps on 12 synthetic images (~15 s on CPU):
    enough for clear heatmap peaks on the test images."""
    from ddpm_landmarks.finetune import finetune

    tmp = tmp_path_factory.mktemp("predict_run")
    cfg = load_config(Path(__file__).parents[2] / "configs" / "finetune" / "synthetic.yaml", [
        f"data.root={tmp / 'syn'}", "data.synthetic_num_images=24",
        "data.synthetic_image_size=96", f"data.synthetic_num_landmarks={NUM_LANDMARKS}",
        "fewshot.budget=12", "fewshot.val_count=4", "model.init=scratch",
        "model.pretrained_path=", "model.preset=tiny", "train.max_steps=30",
        "train.num_workers=0", "train.eval_every=0", "train.checkpoint_every=1000",
        "train.batch_size=4", "optim.warmup_steps=5", "optim.lr=0.002", "logger.kind=none",
        f"run.output_dir={tmp / 'runs'}", "run.name=syn"], cls=FinetuneConfig)
    finetune(cfg)
    run_dir = tmp / "runs" / "syn"
    assert (run_dir / "export" / "regressor.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def synthetic_test(synthetic_run):
    cfg = load_config(synthetic_run / "config.yaml", cls=FinetuneConfig)
    return build_dataset(cfg.data).split("test1")


def copy_images(dataset, folder: Path, indices=None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in (range(len(dataset)) if indices is None else indices):
        src = Path(dataset.records[i].image_path)
        shutil.copy(src, folder / src.name)
        names.append(src.name)
    return names


# Float32 inference in other batch compositions agrees to this many pixels, not to the last bit.
POINT_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------
# predict == evaluate on the same files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flip_tta", [False, True])
def test_predict_equals_evaluate_on_synthetic_test_split(synthetic_run, synthetic_test, tmp_path,
                                                         flip_tta):
    run = load_trained_run(synthetic_run, device="cpu")
    summary = evaluate_run(run, "test1", tmp_path / "eval", flip_tta=flip_tta)
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        evaluated = {}
        for row in csv.DictReader(fh):
            evaluated.setdefault(row["image"], []).append(row)

    names = copy_images(synthetic_test, tmp_path / "images")
    out = tmp_path / "preds.csv"
    argv = ["predict", str(synthetic_run), "--images", str(tmp_path / "images"), "--out", str(out),
            "--device", "cpu", "--batch-size", "3"] + (["--flip-tta"] if flip_tta else [])
    assert main(argv) == 0
    predicted = read_csv(out)
    assert sorted(predicted) == sorted(names)

    found = 0
    for i, sample in enumerate(synthetic_test):
        rows = predicted[Path(sample.meta["path"]).name]
        assert [r["name"] for r in rows] == synthetic_test.landmark_names
        assert (int(rows[0]["width"]), int(rows[0]["height"])) == (96, 96)
        # The synthetic files are the original grids; mapping stays in the loop for the rule.
        assert sample.stored_scale == (1.0, 1.0)
        mine = stored_to_original(points_of(rows), sample.stored_scale)
        ev_rows = sorted(evaluated[sample.id], key=lambda r: int(r["landmark_index"]))
        theirs = np.array([[float(r["x_pred"]) if r["x_pred"] else np.nan,
                            float(r["y_pred"]) if r["y_pred"] else np.nan] for r in ev_rows])
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        # predict runs batches of 3, evaluate of eval.batch_size: float32 convolutions over
        # other batch compositions differ in the last bits (~1e-6 px seen), so the promise is
        # agreement to POINT_ATOL px, far below anything visible in mm.
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=POINT_ATOL, equal_nan=True)
        np.testing.assert_allclose(mine, summary["predictions"][i], rtol=0, atol=POINT_ATOL,
                                   equal_nan=True)
        np.testing.assert_allclose([float(r["confidence"]) for r in rows],
                                   [float(r["confidence"]) for r in ev_rows], rtol=1e-4)
        found += int(np.isfinite(mine).all(axis=1).sum())
    # A trained model: (nearly) every landmark has a peak, so the comparison is not NaN == NaN.
    assert found >= 0.9 * len(synthetic_test) * NUM_LANDMARKS


def test_isbi_predictions_rescored_equal_evaluate(shared_data, tmp_path, torch_one_thread):
    """The acceptance test: predictions written by predict for ISBI images, re-read and
    scored, equal what evaluate reported for the same images."""
    cfg = load_config(None, [f"data.root={shared_data / 'isbi2015'}", "data.dataset=isbi2015",
                             "data.image_size=64", "model.init=scratch",
                             "model.pretrained_path=", "model.preset=tiny",
                             "decoder.min_peak=0"], cls=FinetuneConfig)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    save_regressor(build_regressor(cfg.model, 19, 64), run_dir / "export", config=to_dict(cfg))

    run = load_trained_run(run_dir, device="cpu")
    summary = evaluate_run(run, "test1")          # all 150 test1 images, as the command does
    test = summary["dataset"]
    chosen = [0, 41, 97, 149]
    copy_images(test, tmp_path / "images", chosen)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), "--images", str(tmp_path / "images"), "--out", str(out),
                 "--device", "cpu"]) == 0
    predicted = read_csv(out)
    assert len(predicted) == len(chosen)

    data = HeatmapDataset(test, cfg.data, cfg.augment, cfg.heatmap, train=False)
    pred, gt, spacing, ev_errors = [], [], [], []
    for i in chosen:
        sample = test[i]
        # The file reaches the model bit-identical to what evaluate fed for it.
        model_input, _ = to_model_grid(read_image(tmp_path / "images" /
                                                  Path(sample.meta["path"]).name), 64, "stretch")
        assert torch.equal(model_input, data[i]["image"])
        rows = predicted[Path(sample.meta["path"]).name]
        assert [r["name"] for r in rows] == test.landmark_names
        # The shared ISBI files are downscaled copies (413 x 512 of 1935 x 2400).
        w, h = int(rows[0]["width"]), int(rows[0]["height"])
        assert (w, h) == (sample.image.shape[1], sample.image.shape[0]) != sample.original_size
        file_points = points_of(rows)
        ok = np.isfinite(file_points).all(axis=1)
        assert ((file_points[ok] >= -0.5) & (file_points[ok] <= [w - 0.5, h - 0.5])).all()
        pred.append(stored_to_original(file_points, sample.stored_scale))
        gt.append(sample.landmarks)
        spacing.append(sample.spacing_mm)
        ev_errors.append(summary["errors"][i])
    errors = radial_errors(np.stack(pred), np.stack(gt), np.array(spacing))
    ev_errors = np.stack(ev_errors)
    np.testing.assert_array_equal(np.isinf(errors), np.isinf(ev_errors))
    # Same model and images, other batch compositions (see POINT_ATOL): 1e-4 model-grid px is
    # 1e-4 * 2400 / 64 * 0.1 mm < 4e-4 mm.
    np.testing.assert_allclose(errors, ev_errors, rtol=0, atol=1e-3)
    assert np.isfinite(errors).sum() > 0.5 * errors.size


# ----------------------------------------------------------------------------------------------
# Geometry of files of other sizes
# ----------------------------------------------------------------------------------------------

def test_other_size_and_aspect_map_back_to_the_files_pixels(synthetic_run, synthetic_test,
                                                            tmp_path):
    """A 64 x 64 picture G and the same picture with every pixel repeated 3x across and 2x
    down (192 x 128, another aspect ratio) reach the model as the same grid, so the model
    finds the same points; predict must then report them in each file's pixels: x' = (x + 0.5)
    * 3 - 0.5, y' = (y + 0.5) * 2 - 0.5 (pixel-centre convention). A mapping that drops the
    half-pixel offset, swaps the axes or reports model-grid points is off by >= 1 px."""
    run = load_trained_run(synthetic_run, device="cpu")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        small = cv2.resize(np.round(synthetic_test[i].image * 255).astype(np.uint8), (64, 64),
                           interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"g{i}.png"), small)
        cv2.imwrite(str(folder / f"g{i}_wide.png"), np.repeat(np.repeat(small, 2, 0), 3, 1))
        # Both files give the model the same input (up to float rounding of the warp).
        a, _ = to_model_grid(small.astype(np.float32) / 255, 64, "stretch")
        b, _ = to_model_grid(np.repeat(np.repeat(small, 2, 0), 3, 1).astype(np.float32) / 255,
                             64, "stretch")
        assert (a - b).abs().max() < 1e-6

    result = predict_folder(run, folder)
    assert not result.failed
    by_name = {p.name: p for p in result.predictions}
    checked = 0
    for i in range(3):
        square, wide = by_name[f"g{i}.png"], by_name[f"g{i}_wide.png"]
        assert square.size == (64, 64) and wide.size == (192, 128)
        expected = (square.points + 0.5) * np.array([3.0, 2.0]) - 0.5
        np.testing.assert_allclose(wide.points, expected, rtol=0, atol=1e-3, equal_nan=True)
        checked += int(np.isfinite(expected).all(axis=1).sum())
    assert checked >= 0.9 * 3 * NUM_LANDMARKS


def test_resized_image_gives_points_near_the_resized_truth(synthetic_run, synthetic_test,
                                                           tmp_path):
    """An arbitrary resize (96 x 96 -> 300 x 170): the points come back in the 300 x 170 file's
    pixels, close to where the ground truth lands under the same resize."""
    run = load_trained_run(synthetic_run, device="cpu")
    folder = tmp_path / "images"
    folder.mkdir()
    truths = {}
    for i in range(4):
        sample = synthetic_test[i]
        image = np.round(sample.image * 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{sample.id}.png"), cv2.resize(image, (300, 170)))
        scale = np.array([300 / 96, 170 / 96])
        truths[f"{sample.id}.png"] = (sample.landmarks + 0.5) * scale - 0.5
    result = predict_folder(run, folder)
    errors = np.concatenate([np.linalg.norm(p.points - truths[p.name], axis=1)
                             for p in result.predictions])
    assert all(p.size == (300, 170) for p in result.predictions)
    # Weakly trained model, 96-px images seen at 64 px; model-grid points reported as they are,
    # or mapped to the 96-px training grid, would be tens of pixels off.
    assert np.nanmedian(errors) < 3.0, errors          # ~1 px here


# ----------------------------------------------------------------------------------------------
# Bad input, the command line
# ----------------------------------------------------------------------------------------------

def test_unreadable_files_are_named_counted_and_skipped(synthetic_run, synthetic_test, tmp_path,
                                                        capsys):
    folder = tmp_path / "images"
    good = copy_images(synthetic_test, folder, [0, 1])
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "preds.csv"
    rc = main(["predict", str(synthetic_run), "--images", str(folder), "--out", str(out),
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    assert sorted(read_csv(out)) == sorted(good)
    assert all(len(rows) == NUM_LANDMARKS for rows in read_csv(out).values())
    assert "bad.png" in captured.err and "empty.jpg" in captured.err
    assert "4 images, 2 failed" in captured.err + captured.out


def test_cli_writes_csv_and_overlays(synthetic_run, synthetic_test, tmp_path, capsys):
    folder = tmp_path / "images"
    names = copy_images(synthetic_test, folder, [0, 1])
    copy_images(synthetic_test, folder / "sub", [2])        # searched recursively
    overlays = folder / "overlays"                          # inside the image folder on purpose
    out = tmp_path / "preds.csv"
    argv = ["predict", str(synthetic_run), "--images", str(folder), "--out", str(out),
            "--overlay", str(overlays), "--device", "cpu"]
    assert main(argv) == 0
    expected = sorted(names + [f"sub/{Path(synthetic_test.records[2].image_path).name}"])
    rows = read_csv(out)
    assert sorted(rows) == expected
    assert all(len(r) == NUM_LANDMARKS for r in rows.values())
    back = read_predictions_csv(out)                        # the package's reader agrees
    for name in expected:
        np.testing.assert_array_equal(back[name]["points"], points_of(rows[name]))
        assert back[name]["size"] == (96, 96)
    pngs = sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png"))
    assert pngs == expected
    for name in expected:
        drawn = cv2.imread(str(overlays / name))
        assert drawn.shape == (96, 96, 3)
        b, g, r = (drawn[..., c].astype(int) for c in range(3))
        assert ((r - b > 100) & (r - g > 100)).any()         # red prediction dots
    assert "3 images, 0 failed" in capsys.readouterr().out
    # A second run does not take the overlays of the first for input images.
    assert main(argv) == 0
    assert sorted(read_csv(out)) == expected


def test_missing_landmarks_have_empty_coordinates_and_zero_confidence(synthetic_run,
                                                                      synthetic_test, tmp_path):
    folder = tmp_path / "images"
    copy_images(synthetic_test, folder, [0])
    out = tmp_path / "preds.csv"
    assert main(["predict", str(synthetic_run), "--images", str(folder), "--out", str(out),
                 "--device", "cpu", "decoder.min_peak=1000"]) == 0
    (rows,) = read_csv(out).values()
    assert [(r["x"], r["y"], float(r["confidence"])) for r in rows] == \
        [("", "", 0.0)] * NUM_LANDMARKS


def test_no_images_is_a_clear_error(synthetic_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    rc = main(["predict", str(synthetic_run), "--images", str(tmp_path / "empty"),
               "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert rc == 2
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_landmark_names_fall_back_when_the_dataset_is_absent(tmp_path, synthetic_test):
    """A run whose labelled data is not on this machine still predicts: names L0, L1, ..."""
    cfg = load_config(None, [f"data.root={tmp_path / 'nowhere'}", "data.dataset=generic",
                             "data.image_size=32", "model.init=scratch",
                             "model.pretrained_path=", "model.preset=tiny"], cls=FinetuneConfig)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    save_regressor(build_regressor(cfg.model, 3, 32), run_dir / "export", config=to_dict(cfg))
    copy_images(synthetic_test, tmp_path / "images", [0])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--images", str(tmp_path / "images"), "--out",
                 str(out), "--device", "cpu", "decoder.min_peak=-1000.0"]) == 0
    (rows,) = read_csv(out).values()
    assert [r["name"] for r in rows] == ["L0", "L1", "L2"]
    # Flip TTA needs the dataset's left/right permutation: refused clearly (exit 2).
    assert main(["predict", str(run_dir), "--images", str(tmp_path / "images"), "--out",
                 str(out), "--device", "cpu", "--flip-tta"]) == 2
