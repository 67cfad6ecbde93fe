"""`ddpm-landmarks calibrate RUN`: conformal calibration of a fine-tuned run on labelled images
it has not seen.

    run = load_trained_run("runs/isbi_n50")
    result = calibrate_run(run, count=40, seed=0, alphas=[0.1, 0.05])
    result.calibration, result.path, result.errors, result.scales

Calibration images are a seeded draw (data.splits.draw_calibration) from the run's labelled
training pool (data.train_split) without its few-shot training and validation images (read
back from the run's split files), never from the evaluation split. Each is predicted exactly
as `evaluate` predicts, its errors measured in the dataset's unit, and every score's per-
landmark q_k(alpha) stored in RUN/calibration.json (format: inference/calibration.py; method
and guarantee: evaluation/conformal.py). The guarantee needs the test images to come from the
same distribution as this pool.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import UncertaintyConfig
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import draw_calibration, load_split
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.evaluation.conformal import min_calibration_size
from ddpm_landmarks.evaluation.evaluate import sdr_thresholds
from ddpm_landmarks.evaluation.metrics import radial_errors, summarize
from ddpm_landmarks.inference.calibration import (
    Calibration,
    fit_calibration,
    model_settings,
    save_calibration,
    score_settings,
)
from ddpm_landmarks.inference.runs import (
    TrainedRun,
    default_threshold,
    estimate_labelled,
    load_trained_run,
    unit_scales,
)
from ddpm_landmarks.inference.tta import tta_views
from ddpm_landmarks.inference.uncertainty import SCORES

log = logging.getLogger(__name__)


def calibration_config(cfg: UncertaintyConfig, count: Optional[int] = None,
                       seed: Optional[int] = None, alphas: Optional[Sequence[float]] = None,
                       score: Optional[str] = None, tta: Optional[bool] = None
                       ) -> UncertaintyConfig:
    """The run's uncertainty config with the command's options (None = keep)."""
    changes = {"calibration_count": count, "calibration_seed": seed, "score": score, "tta": tta,
               "alphas": None if alphas is None else [float(a) for a in alphas]}
    ucfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if ucfg.score not in SCORES:
        raise ConfigError(f"uncertainty.score: unknown {ucfg.score!r}; valid: {', '.join(SCORES)}")
    bad = [a for a in ucfg.alphas if not 0.0 < a < 1.0]
    if bad or not ucfg.alphas:
        raise ConfigError(f"uncertainty.alphas: each alpha must be in (0, 1), got {ucfg.alphas}")
    return ucfg


class Calibrated(NamedTuple):
    calibration: Calibration
    path: Path                           # RUN/calibration.json
    errors: np.ndarray                   # (N, K) calibration errors in the dataset's unit
    scales: dict[str, np.ndarray]        # score -> (N, K) scales of the calibration images


def calibrate_run(run: TrainedRun, count: Optional[int] = None, seed: Optional[int] = None,
                  alphas: Optional[Sequence[float]] = None, score: Optional[str] = None,
                  tta: Optional[bool] = None, flip_tta: Optional[bool] = None) -> Calibrated:
    """Draw, predict, fit and write RUN/calibration.json (with the calibration images' error
    summary, to compare with the test split's: a clear gap says they are not exchangeable)."""
    cfg = run.cfg
    ucfg = score_settings(calibration_config(cfg.uncertainty, count, seed, alphas, score, tta),
                          cfg.heatmap)
    flip_tta = cfg.eval.flip_tta if flip_tta is None else flip_tta
    if cfg.data.train_split == cfg.data.eval_split:
        raise ConfigError(f"data.train_split and data.eval_split are both "
                          f"{cfg.data.train_split!r}: calibration images would be test images")
    try:
        split = load_split(run.run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{run.run_dir}: cannot tell which images trained the model ({err}); "
                          f"calibration needs the run's few-shot split files") from None
    dataset = build_dataset(cfg.data)
    pool = dataset.split(cfg.data.train_split)
    seen = split.train_ids + split.val_ids
    try:
        ids = draw_calibration(pool.ids, seen, ucfg.calibration_count, ucfg.calibration_seed)
    except ValueError as err:
        raise ConfigError(f"uncertainty.calibration_count: {err}") from None
    for alpha in ucfg.alphas:
        if len(ids) < min_calibration_size(alpha):
            log.warning("%d calibration images: too few for alpha %g (needs >= %d), its radii "
                        "are infinite", len(ids), alpha, min_calibration_size(alpha))
    images = pool.subset(ids, name=f"{pool.name}:calibration")
    # Stored resolved, for predict, which does not read the dataset.
    ucfg = dataclasses.replace(
        ucfg, flag_radius=default_threshold(pool, cfg, ucfg.flag_radius),
        error_threshold=default_threshold(pool, cfg, ucfg.error_threshold))
    estimator = run.estimator(images.flip_permutation, flip_tta, ucfg)
    est, truths = estimate_labelled(run, images, estimator, ucfg)
    errors = radial_errors(est.points, np.stack([t.landmarks for t in truths]),
                           unit_scales(images, truths))
    draw = {"seed": ucfg.calibration_seed, "count": ucfg.calibration_count,
            "pool_size": len(pool), "excluded": len(set(seen) & set(pool.ids)),
            "policy": f"{len(ids)} images drawn (seed {ucfg.calibration_seed}) from "
                      f"{dataset.name}:{cfg.data.train_split} without the run's {len(seen)} "
                      f"few-shot training and validation images"}
    cal = fit_calibration(errors, est.scales, ucfg.alphas, ucfg,
                          model_settings(cfg, run.weights_dir, flip_tta,
                                         run.stage1_weights_dir), draw, ids,
                          dataset.name, cfg.data.train_split, dataset.unit,
                          tta_views(estimator))
    summary = summarize(errors, sdr_thresholds(pool, cfg.eval), cfg.eval.sdr_inclusive)
    cal.error_summary = {k: summary[k] for k in ("mre", "sd", "median", "n", "missed")}
    path = save_calibration(cal, run.run_dir)
    log.info("calibration: %s -> %s", draw["policy"], path)
    return Calibrated(cal, path, errors, est.scales)


def format_calibration(cal: Calibration) -> str:
    """Markdown: per score and alpha, q over the landmarks (median, max) and infinite count."""
    lines = [f"calibration on {len(cal.ids)} images of {cal.dataset}:{cal.pool_split} "
             f"(n per landmark {min(cal.counts)}-{max(cal.counts)}, their MRE "
             f"{cal.error_summary.get('mre', float('nan')):.3f} {cal.unit}; radius = q x score; "
             f"score 'none' and 'peak': q in {cal.unit})",
             "| score | alpha | median q | max q | landmarks with q = inf |",
             "|---|---|---|---|---|"]
    for name, by_alpha in cal.quantiles.items():
        mark = " (used)" if name == cal.score else ""
        for alpha, q in by_alpha.items():
            finite = q[np.isfinite(q)]
            med = f"{np.median(finite):.3f}" if finite.size else "inf"
            top = f"{finite.max():.3f}" if finite.size else "inf"
            lines.append(f"| {name}{mark} | {alpha:g} | {med} | {top} | "
                         f"{int((~np.isfinite(q)).sum())} |")
    return "\n".join(lines)


def calibrate_after_finetune(run_dir: str | Path) -> Path:
    """finetune's optional last step (uncertainty.calibrate_after_training): calibrate the
    run's best (else export) weights with its own config; returns calibration.json's path."""
    return calibrate_run(load_trained_run(run_dir)).path
