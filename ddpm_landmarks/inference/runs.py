"""A finished fine-tuning run, loaded back for `evaluate` and `predict`.

    run = load_trained_run("runs/finetune_synthetic", weights="best", overrides=["decoder.name=argmax"])
    run.cfg, run.model, run.weights_dir
    summary = evaluate_run(run, split="test1")           # files in run_dir/eval_test1/
    summary = evaluate_run(run, "test1", convention="released")   # eval_test1_released/

The run's own config.yaml is the reference (same data grid, heatmap, loss, decoder); dotted
overrides change what may differ at test time (decoder, eval.*, data.root, ...).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.evaluation.evaluate import (
    evaluate_predictions,
    evaluate_released,
    ground_truths,
    write_overlays,
)
from ddpm_landmarks.inference.predictor import HeatmapPredictor, predict_dataset
from ddpm_landmarks.models.artifacts import weights_folder
from ddpm_landmarks.models.regressor import HeatmapRegressor
from ddpm_landmarks.models.saved_regressor import load_regressor

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: FinetuneConfig
    model: HeatmapRegressor
    weights_dir: Path
    device: torch.device

    def predictor(self, flip_permutation: Optional[Sequence[int]] = None,
                  flip_tta: Optional[bool] = None) -> HeatmapPredictor:
        tta = self.cfg.eval.flip_tta if flip_tta is None else flip_tta
        return HeatmapPredictor(self.model, self.cfg.loss, self.cfg.heatmap, self.cfg.decoder,
                                flip_permutation, flip_tta=tta, device=self.device)


def load_trained_run(run_dir: str | Path, weights: str = "best",
                     overrides: Sequence[str] = (), device: Optional[str] = None) -> TrainedRun:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a fine-tuning run folder (no config.yaml)")
    cfg = load_config(config_file, list(overrides), cls=FinetuneConfig)
    try:
        weights_dir = weights_folder(run_dir, "regressor", weights, "run")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_regressor(weights_dir, map_location=dev).eval()
    return TrainedRun(run_dir, cfg, model, weights_dir, dev)


def check_landmark_count(run: TrainedRun, dataset: LandmarkDataset) -> None:
    if run.model.num_landmarks != dataset.num_landmarks:
        raise DataError(f"{run.weights_dir} predicts {run.model.num_landmarks} landmarks but "
                        f"dataset {dataset.name} has {dataset.num_landmarks}")


def evaluate_run(run: TrainedRun, split: Optional[str] = None,
                 out_dir: Optional[Path] = None, flip_tta: Optional[bool] = None,
                 convention: str = "ours") -> dict:
    """Predict a labelled split, map to original pixels, write metrics / CSVs / overlays.
    convention="released": the errors as the released code computes them
    (evaluation/released_convention.py), into eval_<split>_released/."""
    if convention not in ("ours", "released"):
        raise ConfigError(f"unknown scoring convention {convention!r}; valid: ours, released")
    cfg = run.cfg
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    if split not in dataset.splits and split not in dataset.derived_splits:
        raise ConfigError(f"split {split!r} not in {dataset.name}; its splits: "
                          f"{', '.join(dataset.splits)}")
    test = dataset.split(split)         # a derived split this copy lacks: DataError saying why
    check_landmark_count(run, test)
    tta = cfg.eval.flip_tta if flip_tta is None else flip_tta
    data = HeatmapDataset(test, cfg.data, cfg.augment, cfg.heatmap, train=False)
    predictor = run.predictor(test.flip_permutation, tta)
    indices, points, confidence = predict_dataset(predictor, data, cfg.eval.batch_size)
    truths = ground_truths(test, indices)
    suffix = ("_tta" if tta else "") + ("_released" if convention == "released" else "")
    out_dir = Path(out_dir) if out_dir else run.run_dir / f"eval_{split}{suffix}"
    extra = {"split": split, "weights": str(run.weights_dir), "flip_tta": tta,
             "decoder": cfg.decoder.name, "images": len(truths)}
    if convention == "released":
        try:
            summary = evaluate_released(test, truths, points, out_dir, extra=extra)
        except ValueError as err:
            raise ConfigError(f"--convention released: {err}") from None
        summary["overlays"] = []         # the overlays are drawn in our convention
    else:
        summary = evaluate_predictions(test, truths, points, cfg.eval, out_dir, extra=extra,
                                       confidence=confidence)
        summary["overlays"] = write_overlays(test, truths, points, summary["errors"],
                                             out_dir / "overlays", count=cfg.eval.overlays)
    summary.update(out_dir=out_dir, ids=[t.id for t in truths], predictions=points,
                   confidence=confidence, split=split, dataset=test)
    return summary
