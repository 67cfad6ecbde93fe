"""Fine-tune a pretrained DDPM U-Net (or the same U-Net from scratch, or a baseline encoder) as a
landmark heatmap regressor with few labelled images.

One process:
    ddpm-landmarks finetune configs/finetune/synthetic.yaml model.pretrained_path=runs/demo_pretrain/export
Several processes / GPUs (same flags, same config):
    accelerate launch -m ddpm_landmarks.finetune --config configs/finetune/isbi2015.yaml train.resume=latest

The run folder (run.output_dir/run.name) receives config.yaml, the few-shot split
(split_train_ids.txt, split_val_ids.txt, split.json), metrics.jsonl (loss and validation MRE),
checkpoints/step_*/ (resumable), best/ (the regressor at the best validation MRE) and export/
(the regressor at the last step). `ddpm-landmarks evaluate RUN` scores best/ (else export/).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
from accelerate.utils import set_seed

from ddpm_landmarks.config.finetune import FinetuneConfig, resolve_epochs
from ddpm_landmarks.data.checks import check_run_inputs
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import dataset_fewshot_split, split_files
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.inference.calibrate import calibrate_after_finetune
from ddpm_landmarks.methods.heatmap_regression import HeatmapRegressionMethod
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.training.checkpoint import CheckpointData
from ddpm_landmarks.training.launch import (
    Launch,
    make_trainer,
    repeated_to_fill,
    script_main,
)
from ddpm_landmarks.training.refine_stage import refine_finetune
from ddpm_landmarks.training.validation import landmark_validator

log = logging.getLogger(__name__)


def check_resumed_landmarks(data: CheckpointData, num_landmarks: int) -> None:
    """A clear error when the checkpoint being resumed predicts another number of landmarks
    (e.g. the annotation files changed under an unchanged config)."""
    # conv1x1 head: unet.conv_out.bias; small head: unet.conv_out.{0,1,3}.bias (last = 3);
    # smp baselines: net.segmentation_head.0.bias; the released U-Net: unet.final_conv.
    heads = sorted(k for k in data.model if k.startswith((
        "unet.conv_out.", "net.segmentation_head.", "unet.final_conv.")) and k.endswith("bias"))
    if not heads:
        raise ConfigError(f"{data.path} is not a fine-tuning checkpoint (no heatmap head)")
    found = int(data.model[heads[-1]].shape[0])
    if found != num_landmarks:
        raise ConfigError(f"checkpoint {data.path} predicts {found} landmarks but this run's data "
                          f"has {num_landmarks}; resume only runs of the same dataset (or start "
                          f"a new run.name)")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) one fine-tuning job; returns the engine's summary. A refinement run
    (refine.enabled: the local network of a two-stage pipeline) is training/refine_stage.py."""
    if cfg.refine.enabled:
        return refine_finetune(cfg)
    with Launch.from_env(cfg) as launch:
        check_run_inputs(cfg)              # every image decodes, landmarks, spacing

        # ------------------------------------------------------------------ data
        dataset = build_dataset(cfg.data)
        try:
            split, pool, val_pool = dataset_fewshot_split(dataset, cfg.data.train_split,
                                                          cfg.fewshot)
        except ValueError as err:
            raise ConfigError(f"fewshot: {err}") from None
        try:                           # epochs.max: counted in epochs of these N images
            cfg = resolve_epochs(cfg, len(split.train_ids), launch.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        train_data = HeatmapDataset(pool.subset(split.train_ids), cfg.data, cfg.augment,
                                    cfg.heatmap, train=True,
                                    seed=cfg.train.seed + 7919 * launch.rank)
        val_data = None
        if split.val_ids:
            val_data = HeatmapDataset(val_pool.subset(split.val_ids), cfg.data, cfg.augment,
                                      cfg.heatmap, train=False)
        elif cfg.train.eval_every:
            log.warning("no validation images (fewshot.val_policy=%s): no validation, no best/ "
                        "model, no early stopping", cfg.fewshot.val_policy)

        # ------------------------------------------------------------------ model
        set_seed(cfg.train.seed)           # identical initial head on every process
        try:
            model = build_regressor(cfg.model, dataset.num_landmarks, cfg.data.image_size)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model: {err}") from None
        head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
        groups = param_groups(model, body_lr=cfg.optim.lr, head_lr=head_lr,
                              weight_decay=cfg.optim.weight_decay)
        method = HeatmapRegressionMethod(model, cfg.loss, cfg.heatmap)
        if launch.folder.resume_from is not None:
            check_resumed_landmarks(launch.folder.resume_from, dataset.num_landmarks)

        # ------------------------------------------------------------------ train
        # Only now, with data, split and model checked: a refused run leaves the folder untouched.
        launch.write_run_folder(cfg, split_files(split))
        log.info("few-shot split: %s", split.policy)
        validate = landmark_validator(val_data, cfg) if val_data is not None else None
        trainer = make_trainer(method, repeated_to_fill(train_data, cfg.train.batch_size, launch),
                               cfg, launch, param_groups=groups,
                               validate=validate if cfg.train.eval_every else None)
        summary = trainer.fit()
    if launch.is_main:
        best = summary["best"]
        log.info("done: step %d, loss %.4f%s; models in %s", summary["step"], summary["loss"],
                 f", best val MRE {best:.3f} at step {summary['best_step']}"
                 if np.isfinite(best) else "", launch.run_dir)
    if launch.is_main and cfg.uncertainty.calibrate_after_training:
        summary["calibration"] = str(calibrate_after_finetune(launch.run_dir))
    return summary


if __name__ == "__main__":
    sys.exit(script_main(finetune, FinetuneConfig, __doc__, "ddpm_landmarks.finetune"))
