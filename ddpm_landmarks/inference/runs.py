"""A finished fine-tuning run, loaded back for `evaluate` and `predict`.

    run = load_trained_run("runs/finetune_synthetic", weights="best", overrides=["decoder.name=argmax"])
    run.cfg, run.model, run.weights_dir
    summary = evaluate_run(run, split="test1")           # files in run_dir/eval_test1/
    summary = evaluate_run(run, "test1", convention="released")   # eval_test1_released/

The run's own config.yaml is the reference (same data grid, heatmap, loss, decoder); dotted
overrides change what may differ at test time (decoder, eval.*, data.root, ...).

Uncertainty: evaluate always computes the cheap scores (peak, heatmap spread; the tta score
with --tta-score or when the calibration uses it) and reports how well they rank the errors.
With RUN/calibration.json (`ddpm-landmarks calibrate`) made for these weights and this
decoding, it adds each point's conformal radius and reports the empirical coverage
(inference/calibration.py); a calibration made for other weights or decoding is not used,
with a warning saying what differs.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ddpm_landmarks.config.common import UncertaintyConfig
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.evaluation.evaluate import (
    GroundTruth,
    evaluate_predictions,
    evaluate_released,
    ground_truths,
    sdr_thresholds,
    write_overlays,
)
from ddpm_landmarks.evaluation.metrics import measurement_scale
from ddpm_landmarks.evaluation.uncertainty_report import (
    uncertainty_summary,
    write_uncertainty,
)
from ddpm_landmarks.inference.calibration import (
    Calibration,
    load_calibration,
    model_settings,
)
from ddpm_landmarks.inference.predictor import HeatmapPredictor
from ddpm_landmarks.inference.tta import tta_estimator, tta_views
from ddpm_landmarks.inference.uncertainty import (
    Estimates,
    HeatmapEstimator,
    LandmarkEstimator,
    estimate_dataset,
)
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

    def estimator(self, flip_permutation: Optional[Sequence[int]], flip_tta: bool,
                  ucfg: UncertaintyConfig):
        """The predictor's points plus the spread; wrapped in TTA when ucfg asks for tta."""
        base = HeatmapEstimator(self.predictor(flip_permutation, flip_tta), ucfg, self.cfg.heatmap)
        if not (ucfg.tta or ucfg.score == "tta"):
            return base
        return tta_estimator(base, ucfg, int(self.cfg.data.image_size), flip_permutation)

    def scoring(self, flip_permutation: Optional[Sequence[int]], flip_tta: bool,
                tta_score: bool = False):
        """(estimator, calibration or None, uncertainty config in use) for evaluate / predict:
        the scores as calibrated when the run's calibration applies (a warning says why not
        otherwise), the run's config when it has none; `tta_score` adds the tta score."""
        cal, why = self.calibration(flip_tta)
        ucfg = cal.scoring(self.cfg.uncertainty) if cal else self.cfg.uncertainty
        ucfg = dataclasses.replace(ucfg, tta=ucfg.tta or tta_score)
        estimator = self.estimator(flip_permutation, flip_tta, ucfg)
        if cal is not None and cal.needs_tta and tta_views(estimator) != cal.tta_views:
            why = (f"{self.run_dir / 'calibration.json'} was made with {cal.tta_views} TTA "
                   f"views, here there are {tta_views(estimator)} (the mirrored view needs the "
                   f"dataset's left/right permutation): no radii")
            cal = None
        if why:
            log.warning(why)
        return estimator, cal, ucfg

    def calibration(self, flip_tta: bool) -> tuple[Optional[Calibration], str]:
        """(the run's calibration if it applies to these weights and decoding, else None;
        why not, "" when there is none at all)."""
        try:
            cal = load_calibration(self.run_dir)
        except ValueError as err:
            return None, str(err)
        if cal is None:
            return None, ""
        differ = cal.mismatch(model_settings(self.cfg, self.weights_dir, flip_tta))
        if differ:
            return None, (f"{self.run_dir / 'calibration.json'} was made with another "
                          f"{differ}: no radii (run `ddpm-landmarks calibrate` again)")
        return cal, ""


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


def unit_scales(dataset: LandmarkDataset, truths: Sequence[GroundTruth]) -> np.ndarray:
    """(N, 2) error unit per original pixel (x, y) of each image (mm/px, or 1 for pixels)."""
    return np.array([measurement_scale(dataset, t)[0] for t in truths], dtype=np.float64)


def estimate_labelled(run: TrainedRun, dataset: LandmarkDataset, estimator: LandmarkEstimator,
                      ucfg: UncertaintyConfig) -> tuple[Estimates, list[GroundTruth]]:
    """Points in original pixels and uncertainty scales (in the dataset's unit) for every
    image of a labelled dataset, with their ground truth, in dataset order."""
    check_landmark_count(run, dataset)
    data = HeatmapDataset(dataset, run.cfg.data, run.cfg.augment, run.cfg.heatmap, train=False)
    truths = ground_truths(dataset)
    scales = unit_scales(dataset, truths)
    est = estimate_dataset(estimator, data, lambda items: scales[items], ucfg.score_floor,
                           run.cfg.eval.batch_size)
    assert est.indices == list(range(len(truths)))
    return est, truths


def default_threshold(dataset: LandmarkDataset, cfg, value: Optional[float]) -> float:
    """`value`, or the dataset's smallest SDR threshold (2 mm on ISBI)."""
    return float(value) if value is not None else float(min(sdr_thresholds(dataset, cfg.eval)))


def evaluate_run(run: TrainedRun, split: Optional[str] = None,
                 out_dir: Optional[Path] = None, flip_tta: Optional[bool] = None,
                 tta_score: bool = False, convention: str = "ours") -> dict:
    """Predict a labelled split, map to original pixels, write metrics / CSVs / overlays and
    the uncertainty report (uncertainty.json, sparsification.png, coverage with a calibration).
    convention="released": the errors as the released code computes them
    (evaluation/released_convention.py), into eval_<split>_released/, without the uncertainty
    report (that one is in our convention)."""
    if convention not in ("ours", "released"):
        raise ConfigError(f"unknown scoring convention {convention!r}; valid: ours, released")
    cfg = run.cfg
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    if split not in dataset.splits and split not in dataset.derived_splits:
        raise ConfigError(f"split {split!r} not in {dataset.name}; its splits: "
                          f"{', '.join(dataset.splits)}")
    test = dataset.split(split)         # a derived split this copy lacks: DataError saying why
    tta = cfg.eval.flip_tta if flip_tta is None else flip_tta
    estimator, calibration, ucfg = run.scoring(test.flip_permutation, tta, tta_score)
    est, truths = estimate_labelled(run, test, estimator, ucfg)
    suffix = ("_tta" if tta else "") + ("_released" if convention == "released" else "")
    out_dir = Path(out_dir) if out_dir else run.run_dir / f"eval_{split}{suffix}"
    extra = {"split": split, "weights": str(run.weights_dir), "flip_tta": tta,
             "decoder": cfg.decoder.name, "images": len(truths),
             "calibration": None if calibration is None else calibration.score}
    if convention == "released":
        try:
            summary = evaluate_released(test, truths, est.points, out_dir, extra=extra)
        except ValueError as err:
            raise ConfigError(f"--convention released: {err}") from None
        summary.update(overlays=[], out_dir=out_dir, ids=[t.id for t in truths],
                       predictions=est.points, confidence=est.peak, split=split, dataset=test)
        return summary                 # the overlays and uncertainty are in our convention

    radii = calibration.radii(est.scales) if calibration else None
    flag_radius = default_threshold(test, cfg, cfg.uncertainty.flag_radius)
    columns = {f"uncertainty_{name}": u for name, u in est.scales.items() if name != "none"}
    if radii:
        columns.update({f"radius@{a:g}": r for a, r in radii[calibration.score].items()})
        columns.update({f"flag@{a:g}": (r > flag_radius).astype(int)
                        for a, r in radii[calibration.score].items()})
    summary = evaluate_predictions(test, truths, est.points, cfg.eval, out_dir, extra=extra,
                                   confidence=est.peak, extra_columns=columns)
    report = uncertainty_summary(
        summary["errors"], est.scales, radii,
        threshold=default_threshold(test, cfg, cfg.uncertainty.error_threshold),
        flag_radius=flag_radius, flagged_fraction=cfg.uncertainty.flagged_fraction,
        primary=calibration.score if calibration else None, unit=summary["unit"])
    write_uncertainty(out_dir, report, test.landmark_names)
    regions = None
    if radii:       # the first alpha's region, in original pixels per axis
        scales = unit_scales(test, truths)
        regions = radii[calibration.score][calibration.alphas[0]][..., None] / scales[:, None, :]
    summary["overlays"] = write_overlays(test, truths, est.points, summary["errors"],
                                         out_dir / "overlays", count=cfg.eval.overlays,
                                         regions=regions)
    summary.update(out_dir=out_dir, ids=[t.id for t in truths], predictions=est.points,
                   confidence=est.peak, split=split, dataset=test, uncertainty=report,
                   scales=est.scales, radii=radii)
    return summary
