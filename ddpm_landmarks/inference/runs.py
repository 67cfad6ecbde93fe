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
A refinement run (refine.enabled, training/refine_stage.py) holds both stages: `run.model` is
stage 1 (stage1/, with its own config stage1/config.yaml: `run.stage1_cfg`), `run.refine` the
local network (best/ or export/) with its per-landmark settings (refine.json), and
evaluate_run scores stage 1 (eval_<split>/stage1/) and the final points (eval_<split>/) side
by side. Overrides apply to the run's config: the local stage and refine.* (e.g.
refine.select=all refine.iterations=2 refine.prior_weight=1 refine.max_shift=3).
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
from ddpm_landmarks.evaluation.metrics import csv_text, measurement_scale, summarize
from ddpm_landmarks.evaluation.uncertainty_report import (
    uncertainty_summary,
    write_uncertainty,
)
from ddpm_landmarks.heatmaps.spread import auto_window
from ddpm_landmarks.inference.calibration import (
    Calibration,
    load_calibration,
    model_settings,
)
from ddpm_landmarks.inference.predictor import HeatmapPredictor
from ddpm_landmarks.inference.tta import tta_estimator, tta_views
from ddpm_landmarks.inference.two_stage import (
    PatchRefiner,
    RefineSettings,
    SpreadSettings,
    TwoStagePredictor,
    predict_samples,
    read_refine_file,
)
from ddpm_landmarks.inference.uncertainty import (
    Estimates,
    HeatmapEstimator,
    LandmarkEstimator,
    estimate_dataset,
    two_stage_scales,
)
from ddpm_landmarks.models.artifacts import weights_folder
from ddpm_landmarks.models.regressor import HeatmapRegressor
from ddpm_landmarks.models.saved_regressor import load_regressor
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

STAGE1_DIR = "stage1"          # a refinement run's copy of its stage-1 regressor


@dataclass
class RefineStage:
    """The second stage of a refinement run."""
    model: torch.nn.Module              # the local network (run.weights_dir)
    settings: RefineSettings
    info: Optional[dict] = None         # refine.json (None: not written yet)


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: FinetuneConfig
    model: HeatmapRegressor             # stage 1 of a refinement run (stage1/)
    weights_dir: Path                   # the weights chosen (a refinement run: the local net)
    device: torch.device
    stage1_cfg: Optional[FinetuneConfig] = None     # refinement runs: stage 1's config
    refine: Optional[RefineStage] = None

    @property
    def global_cfg(self) -> FinetuneConfig:
        """The config of the model-grid network (stage 1 of a refinement run)."""
        return self.stage1_cfg if self.stage1_cfg is not None else self.cfg

    def predictor(self, flip_permutation: Optional[Sequence[int]] = None,
                  flip_tta: Optional[bool] = None) -> HeatmapPredictor:
        """The model-grid predictor (stage 1 of a refinement run)."""
        tta = self.cfg.eval.flip_tta if flip_tta is None else flip_tta
        g = self.global_cfg
        return HeatmapPredictor(self.model, g.loss, g.heatmap, g.decoder,
                                flip_permutation, flip_tta=tta, device=self.device)

    def estimator(self, flip_permutation: Optional[Sequence[int]], flip_tta: bool,
                  ucfg: UncertaintyConfig):
        """The predictor's points plus the spread; wrapped in TTA when ucfg asks for tta. A
        refinement run: its TwoStagePredictor measuring both stages' spread (no tta score)."""
        if self.refine is not None:
            if ucfg.tta or ucfg.score == "tta":
                raise ConfigError("the tta uncertainty score is not built for refinement runs "
                                  "(two stages): use uncertainty.score=spread or peak, without "
                                  "--tta-score / --tta")
            spread = SpreadSettings(ucfg.spread, auto_window(self.global_cfg.heatmap),
                                    ucfg.window or auto_window(self.cfg.heatmap))
            return self.two_stage_predictor(flip_permutation, flip_tta, spread)
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
        differ = cal.mismatch(model_settings(self.cfg, self.weights_dir, flip_tta,
                                             self.stage1_weights_dir))
        if differ:
            return None, (f"{self.run_dir / 'calibration.json'} was made with another "
                          f"{differ}: no radii (run `ddpm-landmarks calibrate` again)")
        return cal, ""
    def two_stage_predictor(self, flip_permutation: Optional[Sequence[int]] = None,
                            flip_tta: Optional[bool] = None,
                            spread: Optional[SpreadSettings] = None) -> TwoStagePredictor:
        tta = self.cfg.eval.flip_tta if flip_tta is None else flip_tta
        refiner = PatchRefiner(self.refine.model, self.cfg, self.refine.settings,
                               flip_permutation, flip_tta=tta, device=self.device)
        return TwoStagePredictor(self.predictor(flip_permutation, tta), refiner, spread)

    @property
    def stage1_weights_dir(self) -> Optional[Path]:
        """A refinement run's stage-1 weights (stage1/), else None."""
        return self.run_dir / STAGE1_DIR if self.refine is not None else None


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
    if not cfg.refine.enabled:
        return TrainedRun(run_dir, cfg, model, weights_dir, dev)
    stage1_dir = run_dir / STAGE1_DIR
    try:
        stage1_cfg = load_config(stage1_dir / "config.yaml", cls=FinetuneConfig)
        stage1 = load_regressor(weights_folder(stage1_dir, "regressor", what="stage 1"),
                                map_location=dev).eval()
        info = read_refine_file(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{run_dir}: refinement run without a usable stage 1: {err}") from None
    refine = RefineStage(model, refine_settings(cfg, info, stage1.num_landmarks), info)
    return TrainedRun(run_dir, cfg, stage1, weights_dir, dev, stage1_cfg, refine)


def refine_settings(cfg: FinetuneConfig, info: Optional[dict], num_landmarks: int
                    ) -> RefineSettings:
    """refine.select=validation: the per-landmark iterations of refine.json (every landmark
    cfg.refine.iterations times until it exists); all: cfg.refine.iterations for every one.
    The displacement limit is cfg.refine.max_shift (the unit) in patch pixels."""
    unit_px = info.get("unit_per_patch_pixel") if info else None
    if cfg.refine.max_shift is not None and not unit_px:
        raise ConfigError("refine.max_shift needs refine.json (the patch pixel in the unit): "
                          "finish the refinement run first")
    settings = RefineSettings.uniform(num_landmarks, cfg.refine.iterations, cfg.refine.max_shift,
                                      unit_px)
    if cfg.refine.select == "validation" and info and info.get("iterations") is not None:
        settings.iterations = [min(int(i), cfg.refine.iterations) for i in info["iterations"]]
    return settings


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
    truths = ground_truths(dataset)
    scales = unit_scales(dataset, truths)
    if isinstance(estimator, TwoStagePredictor):      # a refinement run
        result = predict_samples(estimator, dataset, run.cfg.data, run.cfg.augment,
                                 run.cfg.eval.batch_size)
        out = result.output
        est = Estimates(result.indices, out.final, out.final_peak,
                        two_stage_scales(out, scales, ucfg.score_floor), two_stage=out)
    else:
        data = HeatmapDataset(dataset, run.cfg.data, run.cfg.augment, run.cfg.heatmap,
                              train=False)
        est = estimate_dataset(estimator, data, lambda items: scales[items], ucfg.score_floor,
                               run.cfg.eval.batch_size)
    assert est.indices == list(range(len(truths)))
    return est, truths


def default_threshold(dataset: LandmarkDataset, cfg, value: Optional[float]) -> float:
    """`value`, or the dataset's smallest SDR threshold (2 mm on ISBI)."""
    return float(value) if value is not None else float(min(sdr_thresholds(dataset, cfg.eval)))


def _score(test: LandmarkDataset, truths, points, confidence, cfg: FinetuneConfig,
           out_dir: Path, extra: dict) -> dict:
    """Metrics, result files and best / worst overlays of one set of points."""
    summary = evaluate_predictions(test, truths, points, cfg.eval, out_dir, extra=extra,
                                   confidence=confidence)
    summary["overlays"] = write_overlays(test, truths, points, summary["errors"],
                                         out_dir / "overlays", count=cfg.eval.overlays)
    return summary


def compact(summary: dict) -> dict:
    """The headline numbers of a summary (what metrics.json keeps of stage 1)."""
    return {k: summary[k] for k in ("unit", "mre", "sd", "median", "sdr", "n", "missed",
                                    "thresholds")}


def side_by_side_rows(names: Sequence[str], iterations: Sequence[int], stage1: dict,
                      final: dict) -> tuple[list[str], list[list]]:
    """refine_per_landmark.csv: per landmark, how often it is refined and its MRE / SDR at
    the first radius for stage 1 and the final points."""
    t = stage1["thresholds"][0] if stage1["thresholds"] else None
    header = ["landmark_index", "name", "iterations", "stage1_mre", "final_mre"] + (
        [f"stage1_sdr@{t:g}", f"final_sdr@{t:g}"] if t is not None else [])
    rows = []
    for k, name in enumerate(names):
        a, b = summarize(stage1["errors"][:, k], stage1["thresholds"]), \
            summarize(final["errors"][:, k], final["thresholds"])
        row = [k, name, int(iterations[k]), a["mre"], b["mre"]]
        if t is not None:
            row += [a["sdr"][t], b["sdr"][t]]
        rows.append(row)
    return header, rows


def evaluate_run(run: TrainedRun, split: Optional[str] = None,
                 out_dir: Optional[Path] = None, flip_tta: Optional[bool] = None,
                 tta_score: bool = False, convention: str = "ours") -> dict:
    """Predict a labelled split, map to original pixels, write metrics / CSVs / overlays and
    the uncertainty report (uncertainty.json, sparsification.png, coverage with a calibration).
    convention="released": the errors as the released code computes them
    (evaluation/released_convention.py), into eval_<split>_released/, without the uncertainty
    report (that one is in our convention). A refinement run also writes stage 1's files into
    <out>/stage1/ and refine_per_landmark.csv; its summary has "stage1" (the same keys)."""
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

    stage1 = None
    if est.two_stage is not None:      # a refinement run: stage 1 beside the final points
        g = run.global_cfg
        stage1 = _score(test, truths, est.two_stage.stage1, est.two_stage.stage1_peak, g,
                        out_dir / STAGE1_DIR, {**extra, "weights": str(run.stage1_weights_dir),
                                               "decoder": g.decoder.name, "calibration": None})
        extra.update(stage1=compact(stage1), refine_iterations=run.refine.settings.iterations,
                     refine_max_shift=cfg.refine.max_shift,
                     refine_prior_weight=cfg.refine.prior_weight,
                     refine_share_radius=cfg.refine.share_radius,
                     # The cost of stage 2: local-network forwards per image.
                     refine_patches_per_image=float(np.mean(est.two_stage.patches)))
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
    if stage1 is not None:
        header, rows = side_by_side_rows(test.landmark_names, run.refine.settings.iterations,
                                         stage1, summary)
        atomic_write_text(out_dir / "refine_per_landmark.csv", csv_text(header, rows))
        summary["stage1"] = stage1
    summary.update(out_dir=out_dir, ids=[t.id for t in truths], predictions=est.points,
                   confidence=est.peak, split=split, dataset=test, uncertainty=report,
                   scales=est.scales, radii=radii)
    return summary
