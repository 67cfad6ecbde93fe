"""Config of an image-classification run (ddpm_landmarks/classify.py): the data grid, the label
file, an optional label budget with validation draw, augmentation, the classifier, loss,
optimiser, engine and logger sections.

    cfg = load_config("configs/classify/synthetic.yaml", ["model.freeze=encoder"],
                      cls=ClassifyConfig)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from ddpm_landmarks.config import AugmentConfig, DataConfig, FewShotConfig, RunConfig
from ddpm_landmarks.data.class_labels import LabelsConfig
from ddpm_landmarks.models.classifier import ClassifierConfig
from ddpm_landmarks.training.config import LoggerConfig, TrainConfig
from ddpm_landmarks.training.finetune_config import FinetuneOptimConfig


@dataclass
class ClassLossConfig:
    # "none" = plain cross-entropy; "balanced" = n / (K n_k) over the training images (the
    # usual inverse-frequency rule); or one weight per class, in the order of the classes.
    class_weights: Union[Literal["none", "balanced"], list[float]] = "none"
    label_smoothing: float = 0.0


@dataclass
class ClassEvalConfig:
    batch_size: int = 32                # inference batch (validation and evaluate-classifier)
    # What the best/ model and early stopping follow on the validation images: the loss
    # (cross-entropy with the training class weights, no smoothing: the smoothest signal on a
    # small validation set) or 1 - accuracy / balanced accuracy / macro AUC.
    monitor: Literal["loss", "accuracy", "balanced_accuracy", "auc"] = "loss"


def _classify_train() -> TrainConfig:
    return TrainConfig(max_steps=500, batch_size=16, ema=False, ema_decay=0.999,
                       checkpoint_every=100, keep_checkpoints=2, image_every=0, log_every=10,
                       eval_every=50)


def _classify_augment() -> AugmentConfig:
    # Mild geometry; no flip by default (a label may have a side).
    return AugmentConfig(rotation_deg=5.0, scale=(0.95, 1.05), translate=0.03, flip_prob=0.0)


@dataclass
class ClassifyConfig:
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    # budget: labelled training images drawn from data.train_split (None = all); validation per
    # val_policy / val_count unless labels.val_split names a validation split.
    fewshot: FewShotConfig = field(default_factory=lambda: FewShotConfig(val_count=20))
    augment: AugmentConfig = field(default_factory=_classify_augment)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    loss: ClassLossConfig = field(default_factory=ClassLossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=_classify_train)
    eval: ClassEvalConfig = field(default_factory=ClassEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


MONITOR_KEYS = {"loss": "val/loss", "accuracy": "val/error", "balanced_accuracy":
                "val/balanced_error", "auc": "val/1-auc"}
