"""`ddpm-landmarks mean-shape CONFIG`: fit and evaluate the trivial mean-shape predictor.

It goes through everything a real detector will: the few-shot draw (saved in the run folder),
the resize to the model grid, the inverse mapping to original pixels, the metrics, the files.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ddpm_landmarks.config import load_config
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import make_fewshot_split, save_split
from ddpm_landmarks.data.transforms import LandmarkTransform, map_to_original
from ddpm_landmarks.evaluation.evaluate import (GroundTruth, evaluate_predictions, format_summary,
                                                write_overlays)
from ddpm_landmarks.models.mean_shape import MeanShapePredictor
from ddpm_landmarks.utils.runs import prepare_run_dir

log = logging.getLogger(__name__)


def run_mean_shape(cfg, run_dir: Path, split: Optional[str] = None) -> dict:
    """Fit on cfg's few-shot draw, evaluate on `split` (default data.eval_split); files in
    run_dir/eval_<split>/. cfg: any config with data, fewshot, augment and eval sections (the
    experiment grid passes a cell's fine-tuning config)."""
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    train_pool = dataset.split(cfg.data.train_split)
    fewshot = make_fewshot_split(train_pool.ids, cfg.fewshot)
    save_split(fewshot, run_dir)
    log.info("few-shot split: %s", fewshot.policy)

    to_model = LandmarkTransform(cfg.data, cfg.augment, dataset.flip_permutation, train=False)
    train = train_pool.subset(fewshot.train_ids)
    predictor = MeanShapePredictor().fit(to_model(sample).landmarks for sample in train)

    test = dataset.split(split)
    truths, predictions = [], []
    for sample in test:
        transformed = to_model(sample)
        predictions.append(map_to_original(predictor.predict(), transformed.to_original))
        truths.append(GroundTruth.of(sample))
    out_dir = run_dir / f"eval_{split}"
    summary = evaluate_predictions(test, truths, predictions, cfg.eval, out_dir,
                                   extra={"predictor": "mean_shape", "train_images": len(train),
                                          "split": split})
    write_overlays(test, truths, predictions, summary["errors"], out_dir / "overlays")
    summary.update(out_dir=out_dir, train_images=len(train), dataset=test)
    return summary


def cmd_mean_shape(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = prepare_run_dir(cfg)
    summary = run_mean_shape(cfg, run_dir)
    print(format_summary(summary, f"mean shape of {summary['train_images']} images on "
                                  f"{summary['dataset'].name}"))
    print(f"results: {summary['out_dir']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mean-shape", help="evaluate the trivial mean-shape predictor")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fewshot.budget=10")
    p.set_defaults(func=cmd_mean_shape)
