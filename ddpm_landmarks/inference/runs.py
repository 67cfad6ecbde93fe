"""A finished fine-tuning run, loaded back for `evaluate` and `predict`.

    run = load_trained_run("runs/finetune_synthetic", weights="best", overrides=["decoder.name=argmax"])
    run.cfg, run.model, run.weights_dir
    summary = evaluate_run(run, split="test1")           # files in run_dir/eval_test1/

The run's own config.yaml is the reference (same data grid, heatmap, loss, decoder); dotted
overrides change what may differ at test time (decoder, eval.*, data.root, ...).

A refinement run (refine.enabled, training/refine_stage.py) holds both stages: `run.model` is
stage 1 (stage1/, with its own config stage1/config.yaml: `run.stage1_cfg`), `run.refine` the
local network (best/ or export/) with its per-landmark settings (refine.json), and
evaluate_run scores stage 1 (eval_<split>/stage1/) and the final points (eval_<split>/) side
by side. Overrides apply to the run's config: the local stage and refine.* (e.g.
refine.select=all refine.iterations=2 refine.prior_weight=1 refine.max_shift=3).
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
    ground_truths,
    write_overlays,
)
from ddpm_landmarks.evaluation.metrics import csv_text, summarize
from ddpm_landmarks.inference.predictor import HeatmapPredictor, predict_dataset
from ddpm_landmarks.inference.two_stage import (
    PatchRefiner,
    RefineSettings,
    TwoStagePredictor,
    predict_samples,
    read_refine_file,
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

    def two_stage_predictor(self, flip_permutation: Optional[Sequence[int]] = None,
                            flip_tta: Optional[bool] = None) -> TwoStagePredictor:
        tta = self.cfg.eval.flip_tta if flip_tta is None else flip_tta
        refiner = PatchRefiner(self.refine.model, self.cfg, self.refine.settings,
                               flip_permutation, flip_tta=tta, device=self.device)
        return TwoStagePredictor(self.predictor(flip_permutation, tta), refiner)


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
                 out_dir: Optional[Path] = None, flip_tta: Optional[bool] = None) -> dict:
    """Predict a labelled split, map to original pixels, write metrics / CSVs / overlays. A
    refinement run also writes stage 1's into <out>/stage1/ and refine_per_landmark.csv, and
    its summary has "stage1" (the same keys)."""
    cfg = run.cfg
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data)
    if split not in dataset.splits:
        raise ConfigError(f"split {split!r} not in {dataset.name}; its splits: "
                          f"{', '.join(dataset.splits)}")
    test = dataset.split(split)
    check_landmark_count(run, test)
    tta = cfg.eval.flip_tta if flip_tta is None else flip_tta
    out_dir = Path(out_dir) if out_dir else run.run_dir / (f"eval_{split}" + ("_tta" if tta else ""))
    extra = {"split": split, "weights": str(run.weights_dir), "flip_tta": tta,
             "decoder": cfg.decoder.name}
    stage1 = None
    if run.refine is None:
        data = HeatmapDataset(test, cfg.data, cfg.augment, cfg.heatmap, train=False)
        indices, points, confidence = predict_dataset(run.predictor(test.flip_permutation, tta),
                                                      data, cfg.eval.batch_size)
        truths = ground_truths(test, indices)
    else:
        result = predict_samples(run.two_stage_predictor(test.flip_permutation, tta), test,
                                 cfg.data, cfg.augment, cfg.eval.batch_size)
        out = result.output
        indices, points, confidence = result.indices, out.final, out.final_peak
        truths = ground_truths(test, indices)
        stage1 = _score(test, truths, out.stage1, out.stage1_peak, run.global_cfg,
                        out_dir / STAGE1_DIR, {**extra, "images": len(truths),
                                               "weights": str(run.run_dir / STAGE1_DIR),
                                               "decoder": run.global_cfg.decoder.name})
        extra.update(stage1=compact(stage1), refine_iterations=run.refine.settings.iterations,
                     refine_max_shift=cfg.refine.max_shift,
                     refine_prior_weight=cfg.refine.prior_weight)
    extra["images"] = len(truths)
    summary = _score(test, truths, points, confidence, cfg, out_dir, extra)
    if stage1 is not None:
        header, rows = side_by_side_rows(test.landmark_names, run.refine.settings.iterations,
                                         stage1, summary)
        atomic_write_text(out_dir / "refine_per_landmark.csv", csv_text(header, rows))
        summary["stage1"] = stage1
    summary.update(out_dir=out_dir, ids=[t.id for t in truths], predictions=points,
                   confidence=confidence, split=split, dataset=test)
    return summary
