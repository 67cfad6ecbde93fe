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

from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import make_fewshot_split, split_files
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.methods.heatmap_regression import HeatmapRegressionMethod
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.training.launch import (
    Launch,
    make_trainer,
    repeated_to_fill,
    script_main,
)
from ddpm_landmarks.training.refine_stage import refine_finetune
from ddpm_landmarks.training.validation import landmark_validator

log = logging.getLogger(__name__)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) one fine-tuning job; returns the engine's summary. A refinement run
    (refine.enabled: the local network of a two-stage pipeline) is training/refine_stage.py."""
    if cfg.refine.enabled:
        return refine_finetune(cfg)
    launch = Launch.from_env(cfg)

    # ------------------------------------------------------------------ data
    dataset = build_dataset(cfg.data)
    pool = dataset.split(cfg.data.train_split)
    try:
        split = make_fewshot_split(pool.ids, cfg.fewshot)
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    train_data = HeatmapDataset(pool.subset(split.train_ids), cfg.data, cfg.augment, cfg.heatmap,
                                train=True, seed=cfg.train.seed + 7919 * launch.rank)
    val_data = None
    if split.val_ids:
        val_data = HeatmapDataset(pool.subset(split.val_ids), cfg.data, cfg.augment, cfg.heatmap,
                                  train=False)
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

    # ------------------------------------------------------------------ train
    # Only now, with data, split and model checked: a refused run leaves the folder untouched.
    launch.write_run_folder(cfg, split_files(split))
    log.info("few-shot split: %s", split.policy)
    validate = landmark_validator(val_data, cfg) if val_data is not None else None
    trainer = make_trainer(method, repeated_to_fill(train_data, cfg.train.batch_size, launch),
                           cfg, launch, param_groups=groups,
                           validate=validate if cfg.train.eval_every else None)
    summary = trainer.fit()
    launch.release()
    if launch.is_main:
        best = summary["best"]
        log.info("done: step %d, loss %.4f%s; models in %s", summary["step"], summary["loss"],
                 f", best val MRE {best:.3f} at step {summary['best_step']}"
                 if np.isfinite(best) else "", launch.run_dir)
    return summary


if __name__ == "__main__":
    sys.exit(script_main(finetune, FinetuneConfig, __doc__, "ddpm_landmarks.finetune"))
