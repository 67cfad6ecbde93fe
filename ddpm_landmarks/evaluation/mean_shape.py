"""The trivial reference row: fit the mean landmark configuration of the few-shot images and
score it like any detector (`ddpm-landmarks mean-shape CONFIG`, the grid's `mean_shape` init).

It goes through everything a real detector will: the few-shot draw (saved in the run folder),
the resize to the model grid, the inverse mapping to original pixels, the metrics, the files.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ddpm_landmarks.config.schema import save_config
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import dataset_fewshot_split, save_split
from ddpm_landmarks.data.transforms import LandmarkTransform, map_to_original
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.evaluation.evaluate import (
    evaluate_predictions,
    ground_truths,
    write_overlays,
)
from ddpm_landmarks.models.mean_shape import MeanShapePredictor
from ddpm_landmarks.utils.atomic import move_contents_aside
from ddpm_landmarks.utils.logging_setup import setup_logging

log = logging.getLogger(__name__)


def prepare_run_dir(cfg) -> Path:
    """Create run.output_dir/run.name and write the resolved config into it. As for training
    runs, a folder that holds anything belongs to another run: an error, or with
    run.overwrite=true its contents are moved aside first (a mean shape never writes its
    config.yaml over a trained run's)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    contents = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if contents and not cfg.run.overwrite:
        raise ConfigError(f"run folder {run_dir} is not empty ({', '.join(contents[:6])}"
                          f"{', ...' if len(contents) > 6 else ''}): it belongs to another run. "
                          f"Start afresh with run.overwrite=true (moves the old contents "
                          f"aside), or choose another run.name")
    if contents:
        aside = move_contents_aside(run_dir, contents)
        log.warning("run.overwrite: the previous contents of %s moved to %s", run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    return run_dir


def run_mean_shape(cfg, run_dir: Path, split: Optional[str] = None) -> dict:
    """Fit on cfg's few-shot draw, evaluate on `split` (default data.eval_split); files in
    run_dir/eval_<split>/. cfg: any config with data, fewshot, augment and eval sections (the
    experiment grid passes a cell's fine-tuning config)."""
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    fewshot, train_pool, _ = dataset_fewshot_split(dataset, cfg.data.train_split, cfg.fewshot)
    save_split(fewshot, run_dir)
    log.info("few-shot split: %s", fewshot.policy)

    to_model = LandmarkTransform(cfg.data, cfg.augment, dataset.flip_permutation, train=False)
    train = train_pool.subset(fewshot.train_ids)
    predictor = MeanShapePredictor().fit(to_model(sample).landmarks for sample in train)

    test = dataset.split(split)
    truths = ground_truths(test)
    predictions = [map_to_original(predictor.predict(), to_model(sample).to_original)
                   for sample in test]
    out_dir = run_dir / f"eval_{split}"
    summary = evaluate_predictions(test, truths, predictions, cfg.eval, out_dir,
                                   extra={"predictor": "mean_shape", "train_images": len(train),
                                          "split": split})
    write_overlays(test, truths, predictions, summary["errors"], out_dir / "overlays")
    summary.update(out_dir=out_dir, train_images=len(train), dataset=test)
    return summary
