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

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

from accelerate.utils import set_seed

from ddpm_landmarks.config.classify import MONITOR_KEYS, ClassifyConfig
from ddpm_landmarks.data.class_labels import ClassificationImages, load_label_task
from ddpm_landmarks.data.splits import make_fewshot_split, split_files
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.methods.classification import ClassificationMethod, class_weights
from ddpm_landmarks.models.classifier import build_classifier
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.training.launch import (
    Launch,
    make_trainer,
    repeated_to_fill,
    script_main,
)
from ddpm_landmarks.training.validation import classification_validator

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
    launch = Launch.from_env(cfg)

    # ------------------------------------------------------------------ labels, split
    if not launch.is_main and not cfg.labels.file and cfg.data.dataset == "synthetic":
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
    if launch.folder.resume_from is not None:
        check_resumed_classes(launch.run_dir, task.classes)
    train_data = ClassificationImages(train_images, task, cfg.data, cfg.augment, train=True,
                                      seed=cfg.train.seed + 7919 * launch.rank)
    counts = {c: train_data.labels.count(j) for j, c in enumerate(task.classes)}
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
        validate = (classification_validator(val_data, method, cfg.eval.batch_size,
                                             cfg.eval.monitor)
                    if val_data is not None and cfg.train.eval_every else None)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from None
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    groups = param_groups(model, body_lr=cfg.optim.lr, head_lr=head_lr,
                          weight_decay=cfg.optim.weight_decay)

    # ------------------------------------------------------------------ train
    classes = json.dumps({"classes": task.classes, "train_counts": counts,
                          "label_file": str(task.source), "task": task.name}, indent=2) + "\n"
    launch.write_run_folder(cfg, {**split_files(split), CLASSES_FILE: classes})
    log.info("%s: classes %s, training images per class %s, %d validation images", task.name,
             task.classes, counts, len(val_images))
    trainer = make_trainer(method, repeated_to_fill(train_data, cfg.train.batch_size, launch),
                           cfg, launch, param_groups=groups, validate=validate,
                           monitor=MONITOR_KEYS[cfg.eval.monitor])
    summary = trainer.fit()
    launch.release()
    if launch.is_main:
        best = summary["best"]
        log.info("done: step %d, loss %.4f%s; models in %s", summary["step"], summary["loss"],
                 f", best {MONITOR_KEYS[cfg.eval.monitor]} {best:.4f} at step "
                 f"{summary['best_step']}" if math.isfinite(best) else "", launch.run_dir)
    return summary


if __name__ == "__main__":
    sys.exit(script_main(classify, ClassifyConfig, __doc__, "ddpm_landmarks.classify"))
