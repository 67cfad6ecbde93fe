"""Image-level classification fine-tuning on top of any encoder of the harness (a DDPM export,
an SSL export, ImageNet weights, a fine-tuned landmark regressor, or scratch).

One process:
    ddpm-landmarks classify configs/classify/synthetic.yaml model.pretrained_path=runs/demo_pretrain/export
Several processes / GPUs (same flags, same config):
    accelerate launch -m ddpm_landmarks.classify --config configs/classify/aasce_cobb.yaml train.resume=latest
Then:
    ddpm-landmarks evaluate-classifier runs/<run.name> --split test

The run folder (run.output_dir/run.name) receives config.yaml, classes.json (the class names in
logit order, with their training counts), the split (split_train_ids.txt, split_val_ids.txt,
split.json), metrics.jsonl (loss, accuracy, validation loss / accuracy / AUC), checkpoints/
(resumable), best/ (the classifier at the best eval.monitor value) and export/ (last step).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from accelerate.utils import set_seed

from ddpm_landmarks.config import ConfigError, load_config, save_config, to_dict
from ddpm_landmarks.data.class_labels import ClassificationImages, load_label_task
from ddpm_landmarks.data.sample import DataError
from ddpm_landmarks.data.splits import make_fewshot_split, save_split
from ddpm_landmarks.finetune import RepeatedDataset
from ddpm_landmarks.methods.classification import (ClassificationMethod, class_weights,
                                                   make_validator)
from ddpm_landmarks.models.classifier import build_classifier
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.training.checkpoint import resolve_resume
from ddpm_landmarks.training.classify_config import MONITOR_KEYS, ClassifyConfig
from ddpm_landmarks.training.engine import Trainer
from ddpm_landmarks.training.trackers import flatten_config, log_image_grids, tracker_setup
from ddpm_landmarks.utils.atomic import atomic_write_text
from ddpm_landmarks.utils.runs import setup_logging

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"


def check_resumed_classes(run_dir: Path, classes: list[str]) -> None:
    """A resumed run must have the classes it was started with (the head's outputs)."""
    saved = run_dir / CLASSES_FILE
    if saved.is_file():
        before = json.loads(saved.read_text())["classes"]
        if before != classes:
            raise ConfigError(f"{saved}: the run was started with classes {before}, the label "
                              f"file now gives {classes}; resume only with the same labels "
                              f"(or start a new run.name)")


def _wait_for_main(task_file: Path, timeout_s: float = 600.0) -> None:
    """Non-main processes of a synthetic task wait for rank 0 to have generated it."""
    start = time.monotonic()
    while not task_file.is_file() and time.monotonic() - start < timeout_s:
        time.sleep(1.0)


def classify(cfg: ClassifyConfig) -> dict:
    """Run (or resume) one classification fine-tuning job; returns the engine's summary."""
    # ------------------------------------------------------------------ run folder
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    main = rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir if main else None)

    # ------------------------------------------------------------------ labels, split
    if not main and not cfg.labels.file and cfg.data.dataset == "synthetic":
        from ddpm_landmarks.data.synthetic_classes import marker_task_dir
        _wait_for_main(marker_task_dir(cfg.data) / "labels.csv")
    task = load_label_task(cfg.labels, cfg.data)
    pool = task.split(cfg.data.train_split)
    # A validation split of the labels replaces the fewshot section's validation draw.
    fewshot = (dataclasses.replace(cfg.fewshot, val_policy="none") if cfg.labels.val_split
               else cfg.fewshot)
    try:
        split = make_fewshot_split([i.id for i in pool], fewshot)
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    if cfg.labels.val_split:
        split.val_ids = [i.id for i in task.split(cfg.labels.val_split)]
        split.val_policy = f"labels.val_split={cfg.labels.val_split}"
        split.val_count = len(split.val_ids)
        val_images = task.split(cfg.labels.val_split)
    else:
        val_images = task.subset(pool, split.val_ids)
    train_images = task.subset(pool, split.train_ids)
    task.check_training_classes(train_images, f"split {cfg.data.train_split!r}, "
                                f"{split.policy}")
    if resolve_resume(run_dir, cfg.train.resume) is not None:
        check_resumed_classes(run_dir, task.classes)
    train_data = ClassificationImages(train_images, task, cfg.data, cfg.augment, train=True,
                                      seed=cfg.train.seed + 7919 * rank)
    counts = {c: train_data.labels.count(j) for j, c in enumerate(task.classes)}
    if main:
        save_split(split, run_dir)
        atomic_write_text(run_dir / CLASSES_FILE, json.dumps(
            {"classes": task.classes, "train_counts": counts, "label_file": str(task.source),
             "task": task.name}, indent=2) + "\n")
    log.info("%s: classes %s, training images per class %s, %d validation images", task.name,
             task.classes, counts, len(val_images))
    per_step = cfg.train.batch_size * world
    train_set = RepeatedDataset(train_data, math.ceil(per_step / len(train_data)))
    val_data = None
    if val_images:
        val_data = ClassificationImages(val_images, task, cfg.data, cfg.augment, train=False)
    elif cfg.train.eval_every:
        log.warning("no validation images: no validation, no best/ model, no early stopping")

    # ------------------------------------------------------------------ model
    set_seed(cfg.train.seed)           # identical initial head on every process
    try:
        model = build_classifier(cfg.model, len(task.classes), cfg.data.image_size)
        weights = class_weights(cfg.loss.class_weights, train_data.labels, len(task.classes))
        method = ClassificationMethod(model, task.classes, weights, cfg.loss.label_smoothing)
        validate = (make_validator(val_data, method, cfg.eval.batch_size, cfg.eval.monitor)
                    if val_data is not None and cfg.train.eval_every else None)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from None
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    groups = param_groups(model, body_lr=cfg.optim.lr, head_lr=head_lr,
                          weight_decay=cfg.optim.weight_decay)

    # ------------------------------------------------------------------ train
    config_dict = to_dict(cfg)
    log_with, init_kwargs = tracker_setup(cfg.logger, run_dir, run_name=cfg.run.name)

    def init_trackers(accelerator) -> None:
        if log_with is not None:
            accelerator.init_trackers(cfg.logger.project, config=flatten_config(config_dict),
                                      init_kwargs=init_kwargs)

    try:
        trainer = Trainer(method, train_set, cfg.train, cfg.optim, run_dir, config_dict,
                          log_with=log_with, init_trackers=init_trackers,
                          log_images=log_image_grids, param_groups=groups, validate=validate,
                          monitor=MONITOR_KEYS[cfg.eval.monitor])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    summary = trainer.fit()
    if main:
        best = summary["best"]
        log.info("done: step %d, loss %.4f%s; models in %s", summary["step"], summary["loss"],
                 f", best {MONITOR_KEYS[cfg.eval.monitor]} {best:.4f} at step "
                 f"{summary['best_step']}" if math.isfinite(best) else "", run_dir)
    return summary


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m ddpm_landmarks.classify", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/classify/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.freeze=encoder")
    return parser


def run_from_args(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides, cls=ClassifyConfig)
    classify(cfg)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args.config, args.overrides)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
