"""The command line on the synthetic data: inspect, preview, mean-shape, and bad input."""
import json

import cv2
import numpy as np
import pytest

from ddpm_landmarks.cli.main import main
from ddpm_landmarks.config.schema import load_config


@pytest.fixture()
def synthetic_config(tmp_path):
    path = tmp_path / "synthetic.yaml"
    path.write_text(f"""
data:
  dataset: synthetic
  root: {tmp_path / 'syn'}
  image_size: 64
  synthetic_num_images: 24
  synthetic_image_size: 96
  synthetic_num_landmarks: 6
fewshot:
  budget: 8
  val_count: 4
run:
  output_dir: {tmp_path / 'runs'}
  name: test
""")
    return path


def test_inspect_prints_counts_sizes_spacing(synthetic_config, capsys):
    assert main(["data", "inspect", str(synthetic_config)]) == 0
    out = capsys.readouterr().out
    assert "24 images, 6 landmarks" in out
    assert "split 'train'" in out and "split 'test1'" in out
    assert "96x96" in out and "0.5x0.5" in out and "missing landmarks: 0" in out


def test_preview_writes_a_png_grid(synthetic_config, tmp_path):
    out = tmp_path / "preview.png"
    assert main(["data", "preview", str(synthetic_config), "--out", str(out), "--num", "5",
                 "data.image_size=32"]) == 0
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] >= 300 and image.std() > 5


def test_mean_shape_end_to_end_writes_run_folder(synthetic_config, tmp_path, capsys):
    assert main(["mean-shape", str(synthetic_config)]) == 0
    run = tmp_path / "runs" / "test"
    # The resolved config is saved and reloads to the same thing the command used.
    assert load_config(run / "config.yaml").fewshot.budget == 8
    assert len((run / "split_train_ids.txt").read_text().split()) == 8
    metrics = json.loads((run / "eval_test1" / "metrics.json").read_text())
    assert metrics["unit"] == "mm" and metrics["n"] == 8 * 6 and metrics["missed"] == 0
    assert 0 < metrics["mre"] < 20
    assert len(list((run / "eval_test1" / "overlays").glob("*.png"))) == 6
    assert "| MRE |" in capsys.readouterr().out
    # The folder now belongs to that run: a second mean shape is refused before it writes
    # anything; with run.overwrite=true the old contents move aside.
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["mean-shape", str(synthetic_config), "fewshot.budget=5"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert load_config(run / "config.yaml").fewshot.budget == 8
    assert main(["mean-shape", str(synthetic_config), "fewshot.budget=5",
                 "run.overwrite=true"]) == 0
    assert load_config(run / "config.yaml").fewshot.budget == 5
    aside = list(run.parent.glob("test.replaced-*"))
    assert len(aside) == 1 and load_config(aside[0] / "config.yaml").fewshot.budget == 8


def test_perfect_predictions_round_trip_to_zero_error(synthetic_config):
    # Ground truth -> model grid -> back to original pixels must give 0 mm, through the same
    # code path a detector uses.
    from ddpm_landmarks.data.registry import build_dataset
    from ddpm_landmarks.data.transforms import LandmarkTransform, map_to_original
    from ddpm_landmarks.evaluation.evaluate import GroundTruth, evaluate_predictions

    cfg = load_config(synthetic_config, ["data.resize_mode=letterbox", "data.image_size=40"])
    test = build_dataset(cfg.data).split("test1")
    to_model = LandmarkTransform(cfg.data, cfg.augment, test.flip_permutation)
    truths, preds = [], []
    for sample in test:
        t = to_model(sample)
        preds.append(map_to_original(t.landmarks, t.to_original))
        truths.append(GroundTruth.of(sample))
    summary = evaluate_predictions(test, truths, np.stack(preds), cfg.eval)
    assert summary["mre"] < 1e-9 and summary["sdr"][cfg.eval.sdr_thresholds[0] if cfg.eval.sdr_thresholds else 1.0] == 100.0


def test_bad_config_key_is_a_clear_error(synthetic_config, capsys):
    assert main(["data", "inspect", str(synthetic_config), "data.imagesize=3"]) == 2
    err = capsys.readouterr().err
    assert "data.imagesize" in err and "image_size" in err


def test_unknown_dataset_lists_valid_ones(synthetic_config, capsys):
    assert main(["data", "inspect", str(synthetic_config), "data.dataset=nope"]) == 2
    assert "isbi2015" in capsys.readouterr().err


def test_data_check_recognises_every_shipped_config():
    """`data check CONFIG` picks the run config class from the file's sections: each shipped
    config loads as the class of its folder."""
    from pathlib import Path

    from ddpm_landmarks.cli.data_commands import config_class
    root = Path(__file__).resolve().parents[2] / "configs"
    expected = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig",
                "classify": "ClassifyConfig", "configs": "ExperimentConfig"}
    paths = sorted(root.rglob("*.yaml"))
    assert len(paths) >= 30
    for path in paths:
        folder = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 \
            else "configs"
        cls = config_class(str(path), "auto")
        assert cls.__name__ == expected[folder], path
        load_config(path, cls=cls)
    assert config_class(str(paths[0]), "finetune").__name__ == "FinetuneConfig"


def test_data_check_synthetic(synthetic_config, capsys):
    assert main(["data", "check", str(synthetic_config)]) == 0
    out = capsys.readouterr().out
    assert "dataset inputs (data.on_bad_sample=error)" in out
    assert "synthetic:train: 16 images" in out and "synthetic:test1: 8 images" in out
    assert "all pass: 24 image files decode" in out
