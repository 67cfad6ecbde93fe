"""A finished fine-tuning run, loaded back for `evaluate` and `predict`.

    run = load_trained_run("runs/finetune_synthetic", weights="best", overrides=["decoder.name=argmax"])
    run.cfg, run.model, run.weights_dir
    summary = evaluate_run(run, split="test1")           # files in run_dir/eval_test1/

The run's own config.yaml is the reference (same data grid, heatmap, loss, decoder); dotted
overrides change what may differ at test time (decoder, eval.*, data.root, ...).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpm_landmarks.config import ConfigError, load_config
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import DataError, LandmarkDataset
from ddpm_landmarks.evaluation.evaluate import (GroundTruth, evaluate_predictions, write_overlays)
from ddpm_landmarks.evaluation.inference import HeatmapPredictor, predict_dataset
from ddpm_landmarks.models.regressor import HeatmapRegressor, load_regressor
from ddpm_landmarks.training.finetune_config import FinetuneConfig

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


def resolve_weights(run_dir: Path, weights: str) -> Path:
    """"best" (falls back to "export" when the run had no validation), "export", or a path."""
    if weights == "best":
        for name in ("best", "export"):
            if (run_dir / name / "regressor.json").is_file():
                return run_dir / name
        raise FileNotFoundError(f"{run_dir}: no trained model (neither best/ nor export/ holds "
                                f"regressor.json); has the fine-tuning run finished?")
    path = run_dir / weights if weights == "export" else Path(weights)
    if not (path / "regressor.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved regressor (no regressor.json)")
    return path


def load_trained_run(run_dir: str | Path, weights: str = "best",
                     overrides: Sequence[str] = (), device: Optional[str] = None) -> TrainedRun:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a fine-tuning run folder (no config.yaml)")
    cfg = load_config(config_file, list(overrides), cls=FinetuneConfig)
    try:
        weights_dir = resolve_weights(run_dir, weights)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_regressor(weights_dir, map_location=dev).eval()
    return TrainedRun(run_dir, cfg, model, weights_dir, dev)


def check_landmark_count(run: TrainedRun, dataset: LandmarkDataset) -> None:
    if run.model.num_landmarks != dataset.num_landmarks:
        raise DataError(f"{run.weights_dir} predicts {run.model.num_landmarks} landmarks but "
                        f"dataset {dataset.name} has {dataset.num_landmarks}")


def evaluate_run(run: TrainedRun, split: Optional[str] = None,
                 out_dir: Optional[Path] = None, flip_tta: Optional[bool] = None) -> dict:
    """Predict a labelled split, map to original pixels, write metrics / CSVs / overlays."""
    cfg = run.cfg
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    if split not in dataset.splits:
        raise ConfigError(f"split {split!r} not in {dataset.name}; its splits: "
                          f"{', '.join(dataset.splits)}")
    test = dataset.split(split)
    check_landmark_count(run, test)
    tta = cfg.eval.flip_tta if flip_tta is None else flip_tta
    data = HeatmapDataset(test, cfg.data, cfg.augment, cfg.heatmap, train=False)
    predictor = run.predictor(test.flip_permutation, tta)
    indices, points, confidence = predict_dataset(predictor, data, cfg.eval.batch_size)
    truths = [GroundTruth.of(test[i]) for i in indices]
    out_dir = Path(out_dir) if out_dir else run.run_dir / (f"eval_{split}" + ("_tta" if tta else ""))
    extra = {"split": split, "weights": str(run.weights_dir), "flip_tta": tta,
             "decoder": cfg.decoder.name, "images": len(truths)}
    summary = evaluate_predictions(test, truths, points, cfg.eval, out_dir, extra=extra,
                                   confidence=confidence)
    summary["overlays"] = write_overlays(test, truths, points, summary["errors"],
                                         out_dir / "overlays", count=cfg.eval.overlays)
    summary.update(out_dir=out_dir, ids=[t.id for t in truths], predictions=points,
                   confidence=confidence, split=split, dataset=test)
    return summary
