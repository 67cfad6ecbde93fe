"""Stage 2 of the coarse-to-fine pipeline: train the local network of a refinement run.

    ddpm-landmarks finetune configs/finetune/isbi2015_refine.yaml refine.stage1=runs/isbi_s1
    (finetune() hands a config with refine.enabled=true to refine_finetune)

The run starts from a finished stage-1 fine-tuning run (refine.stage1) and trains on the same
labelled images: its few-shot split must be stage 1's (same fewshot section and pool; checked
against the stage-1 run's split files), and its data grid stage 1's. Steps:
  1. stage 1 predicts its validation images (held-out training images, never a test split);
     its per-landmark RMS error per axis (times refine.jitter_scale), or refine.jitter, is the
     spread of the patch-centre jitter in training;
  2. the local network (model.*: any arch / init of fine-tuning, built for refine.patch_size)
     is trained by the shared engine as a HeatmapRegressionMethod on PatchDataset items (one
     per labelled image and landmark; only the patch's landmark supervised, or every visible
     one; with refine.share_radius the centre also moves within it, as a shared patch's
     would at inference); validation = the final MRE of both stages on the validation images (every landmark
     refined refine.iterations times), which picks best/;
  3. with best/ (else export/), every landmark is refined up to refine.iterations times on the
     validation images and the number of refinements with the lowest mean error is kept per
     landmark (0 = stage 1's point) in refine.json (refine.select=validation).
The run folder holds both stages: stage1/ (a copy of the stage-1 regressor and its config),
best/ and export/ (the local network), refine.json; `evaluate` and `predict` use them all.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from ddpm_landmarks.config.finetune import FinetuneConfig, resolve_epochs
from ddpm_landmarks.data.checks import check_run_inputs
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.patches import PatchDataset, patch_pixel
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import dataset_fewshot_split, load_split, split_files
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.evaluation.evaluate import evaluate_predictions, ground_truths
from ddpm_landmarks.evaluation.metrics import measurement_scale, radial_errors
from ddpm_landmarks.heatmaps.decoders import never_abstain
from ddpm_landmarks.inference.predictor import predict_dataset
from ddpm_landmarks.inference.runs import STAGE1_DIR, load_trained_run
from ddpm_landmarks.inference.two_stage import (
    PatchRefiner,
    RefineSettings,
    TwoStagePredictor,
    choose_iterations,
    predict_samples,
    write_refine_file,
)
from ddpm_landmarks.methods.heatmap_regression import HeatmapRegressionMethod
from ddpm_landmarks.models.artifacts import weights_folder
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.models.saved_regressor import load_regressor
from ddpm_landmarks.training.launch import Launch, make_trainer, repeated_to_fill
from ddpm_landmarks.utils.atomic import atomic_directory

log = logging.getLogger(__name__)

# Data settings a refinement run must share with its stage 1.
SHARED_DATA = ("dataset", "ground_truth", "train_split", "image_size", "resize_mode")


def load_stage1(cfg: FinetuneConfig):
    """The stage-1 run (a TrainedRun), checked: a one-stage run on the same data grid."""
    if not cfg.refine.stage1:
        raise ConfigError("refine.enabled=true needs refine.stage1: the folder of a finished "
                          "stage-1 fine-tuning run")
    folder = Path(cfg.refine.stage1)
    if folder.name in ("best", "export") and (folder.parent / "config.yaml").is_file():
        folder = folder.parent
    try:
        stage1 = load_trained_run(folder, cfg.refine.stage1_weights, device="cpu")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"refine.stage1: {err}") from None
    if stage1.refine is not None:
        raise ConfigError(f"refine.stage1: {folder} is itself a refinement run; give its "
                          f"stage-1 run")
    for key in SHARED_DATA:
        mine, theirs = getattr(cfg.data, key), getattr(stage1.cfg.data, key)
        if mine != theirs:
            raise ConfigError(f"data.{key}={mine} differs from the stage-1 run's ({theirs}, "
                              f"{folder / 'config.yaml'}): a refinement run works on stage 1's "
                              f"data and grid; set data.{key}={theirs}")
    return stage1


def check_same_split(split, stage1_dir: Path) -> None:
    """The refinement run trains on exactly stage 1's labelled and validation images."""
    theirs = load_split(stage1_dir)
    if (split.train_ids, split.val_ids) != (theirs.train_ids, theirs.val_ids):
        raise ConfigError(f"fewshot: this run's split ({len(split.train_ids)} train / "
                          f"{len(split.val_ids)} val images) is not the stage-1 run's "
                          f"({stage1_dir}/split_train_ids.txt): set the fewshot section "
                          f"as in {stage1_dir / 'config.yaml'}")


def unit_scales(dataset) -> np.ndarray:
    """(N, 2) error unit per original pixel (x, y) of every image of `dataset`."""
    return np.array([measurement_scale(dataset, dataset[i])[0] for i in range(len(dataset))])


def jitter_in_unit(cfg: FinetuneConfig, stage1_errors: np.ndarray | None,
                   num_landmarks: int) -> np.ndarray:
    """(K, 2) jitter standard deviation per landmark and axis in the dataset's unit."""
    if cfg.refine.jitter is not None:
        return np.full((num_landmarks, 2), float(cfg.refine.jitter))
    if stage1_errors is None:
        raise ConfigError("refine.jitter=null estimates the jitter from stage 1's errors on the "
                          "validation images, but this run has none (fewshot.val_policy=none): "
                          "set refine.jitter (in the dataset's unit)")
    if not np.isfinite(stage1_errors).any():
        raise ConfigError("stage 1 locates no landmark on the validation images, so its errors "
                          "cannot set the jitter: set refine.jitter (in the dataset's unit)")
    squared = np.where(np.isfinite(stage1_errors), stage1_errors ** 2, np.nan)
    seen = np.isfinite(squared).any(axis=0)
    rms = np.sqrt(np.nanmean(np.where(seen, squared, 0.0), axis=0))            # (K, 2)
    # A landmark stage 1 never located on them: the mean over the others.
    rms = np.where(seen, rms, np.sqrt(np.nanmean(squared)))
    return cfg.refine.jitter_scale * rms


def signed_errors(points: np.ndarray, truths, scales: np.ndarray) -> np.ndarray:
    """(N, K, 2) prediction - truth per axis in the unit."""
    gt = np.stack([t.landmarks for t in truths])
    return (points - gt) * scales[:, None, :]


def copy_stage1(stage1, run_dir: Path) -> None:
    """run_dir/stage1/ = the stage-1 regressor folder (weights, regressor.json, config.yaml)."""
    source = stage1.weights_dir
    with atomic_directory(run_dir / STAGE1_DIR) as tmp:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if not (tmp / "config.yaml").is_file():
            shutil.copy2(stage1.run_dir / "config.yaml", tmp / "config.yaml")
    shutil.copy2(stage1.run_dir / "split.json", run_dir / STAGE1_DIR / "split.json")


def refine_finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a refinement run (module doc); returns the engine's summary."""
    with Launch.from_env(cfg) as launch:
        check_run_inputs(cfg)          # every image decodes, landmarks, spacing
        summary = _train_refinement(cfg, launch)
    return summary


def _train_refinement(cfg: FinetuneConfig, launch: Launch) -> dict:
    stage1 = load_stage1(cfg)
    dataset = build_dataset(cfg.data)
    try:
        split, pool, val_pool = dataset_fewshot_split(dataset, cfg.data.train_split,
                                                      cfg.fewshot)
        cfg = resolve_epochs(cfg, len(split.train_ids), launch.world_size)
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    check_same_split(split, stage1.run_dir)
    train = pool.subset(split.train_ids)
    val = val_pool.subset(split.val_ids) if split.val_ids else None
    k = dataset.num_landmarks

    # -------------------------------------------------------- stage 1 on the validation images
    # Decoded without abstaining, as validation does: every landmark gets a stage-1 point.
    stage1_predictor = stage1.predictor()
    stage1_predictor.decoder_cfg = never_abstain(stage1_predictor.decoder_cfg)
    settings = RefineSettings.uniform(k, cfg.refine.iterations)
    val_errors = None
    if val is not None:
        data = HeatmapDataset(val, cfg.data, cfg.augment, stage1.cfg.heatmap, train=False)
        _, points, _ = predict_dataset(stage1_predictor, data, cfg.eval.batch_size)
        val_errors = signed_errors(points, ground_truths(val), unit_scales(val))
    jitter = jitter_in_unit(cfg, val_errors, k)
    scales = unit_scales(train)
    jitter_px = jitter[None] / scales[:, None, :]                   # (N, K, 2) original px
    log.info("patch-centre jitter per landmark (%s, x/y): %s", dataset.unit,
             ", ".join(f"{a:.2f}/{b:.2f}" for a, b in jitter))

    # ------------------------------------------------------------------ local network
    embedding = cfg.refine.landmark_input == "embedding"
    if embedding and cfg.model.arch != "ddpm_unet":
        raise ConfigError(f"refine.landmark_input=embedding needs model.arch=ddpm_unet (the "
                          f"index is embedded with the time step), not {cfg.model.arch}")
    try:
        patches = PatchDataset(train, cfg.augment, cfg.heatmap, cfg.refine.patch_size,
                               cfg.refine.grid, jitter_px, cfg.refine.supervise, train=True,
                               seed=cfg.train.seed + 7919 * launch.rank,
                               own_channel_only=embedding,
                               share_radius=cfg.refine.share_radius)
    except ValueError as err:
        raise ConfigError(f"refine: {err}") from None
    set_seed(cfg.train.seed)
    model_cfg = dataclasses.replace(cfg.model, landmark_embedding=k if embedding else 0)
    try:
        model = build_regressor(model_cfg, 1 if embedding else k, cfg.refine.patch_size)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from None
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    groups = param_groups(model, body_lr=cfg.optim.lr, head_lr=head_lr,
                          weight_decay=cfg.optim.weight_decay)
    method = HeatmapRegressionMethod(model, cfg.loss, cfg.heatmap)

    # ------------------------------------------------------------------ train
    launch.write_run_folder(cfg, split_files(split))
    if launch.is_main:
        (launch.run_dir / "refine.json").unlink(missing_ok=True)   # of an earlier attempt
        copy_stage1(stage1, launch.run_dir)
    validate = None
    if val is not None and cfg.train.eval_every:
        validate = two_stage_validator(stage1_predictor, val, cfg, settings)
    trainer = make_trainer(method, repeated_to_fill(patches, cfg.train.batch_size, launch), cfg,
                           launch, param_groups=groups, validate=validate)
    summary = trainer.fit()
    if launch.is_main:
        choose_and_record(cfg, launch.run_dir, stage1, stage1_predictor, val, train, jitter)
    return summary


def two_stage_validator(stage1_predictor, val, cfg: FinetuneConfig, settings: RefineSettings):
    """validate(local model) -> {"val/mre", ...}: both stages on the validation images,
    decoded without abstaining (a patch without a peak keeps stage 1's point)."""
    truths = ground_truths(val)
    local_cfg = dataclasses.replace(cfg, decoder=never_abstain(cfg.decoder))

    def validate(model) -> dict:
        refiner = PatchRefiner(model, local_cfg, settings)
        out = predict_samples(TwoStagePredictor(stage1_predictor, refiner), val, cfg.data,
                              cfg.augment, cfg.eval.batch_size).output
        summary = evaluate_predictions(val, truths, out.final, cfg.eval)
        stage1 = evaluate_predictions(val, truths, out.stage1, cfg.eval)
        values = {"val/mre": summary["mre"], "val/sd": summary["sd"],
                  "val/missed": summary["missed"], "val/stage1_mre": stage1["mre"]}
        values.update({f"val/sdr@{t:g}": v for t, v in summary["sdr"].items()})
        return values

    return validate


def choose_and_record(cfg: FinetuneConfig, run_dir: Path, stage1, stage1_predictor, val,
                      train, jitter: np.ndarray) -> None:
    """refine.json: per-landmark iterations chosen on the validation images with best/
    (refine.select=validation; all: refine.iterations everywhere), the patch pixel in the
    unit, the jitter, and the validation errors per number of refinements."""
    k = len(jitter)
    weights = weights_folder(run_dir, "regressor", "best")
    model = load_regressor(weights).eval()
    scales = unit_scales(train)
    pixel = float(np.median([patch_pixel(train[i].original_size, cfg.refine.grid)
                             * np.sqrt(np.prod(scales[i])) for i in range(len(train))]))
    content = {"weights": weights.name, "select": cfg.refine.select, "unit": train.unit,
               "unit_per_patch_pixel": pixel, "jitter": jitter.tolist(),
               "stage1": {"run": str(stage1.run_dir), "weights": str(stage1.weights_dir)},
               "iterations": [cfg.refine.iterations] * k}
    if val is not None:
        limit = RefineSettings.uniform(k, cfg.refine.iterations, cfg.refine.max_shift, pixel)
        refiner = PatchRefiner(model, cfg, limit)
        explored = predict_samples(TwoStagePredictor(stage1_predictor, refiner), val, cfg.data,
                                   cfg.augment, cfg.eval.batch_size, explore=True).output
        gt = np.stack([t.landmarks for t in ground_truths(val)])
        errors = np.stack([radial_errors(points, gt, unit_scales(val))
                           for points in explored.history])         # (I + 1, N, K)
        if cfg.refine.select == "validation":
            content["iterations"] = choose_iterations(errors)
        content["validation"] = {
            "images": len(val), "mre_by_iterations": [float(np.nanmean(e)) for e in errors],
            "per_landmark_mre_by_iterations": np.nanmean(errors, axis=1).T.tolist()}
    write_refine_file(run_dir, content)
    log.info("refine.json: iterations per landmark %s", content["iterations"])

