"""Config of an image-classification run (ddpm_landmarks/classify.py): the data grid, the label
file, an optional label budget with validation draw, augmentation, the classifier, loss,
optimiser, engine and logger sections.

    cfg = load_config("configs/classify/synthetic.yaml", ["model.freeze=encoder"],
                      cls=ClassifyConfig)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    FewShotConfig,
    RunConfig,
)
from ddpm_landmarks.config.finetune import FinetuneOptimConfig
from ddpm_landmarks.config.ranges import ranged
from ddpm_landmarks.config.training import LoggerConfig, TrainConfig


@dataclass
class LabelsConfig:
    """The label file and where its images are (module doc)."""
    file: str = ""                      # CSV image,label[,split]; "" = synthetic marker task
    images: str = ""                    # image folder; "" = the images of data.dataset
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"         # used when the CSV has it
    # Validation images: this split of the file / dataset; "" = drawn from data.train_split by
    # the fewshot section (val_policy, val_count).
    val_split: str = ""
    # Valid names in the CSV's split column; [] = data.train_split, labels.val_split,
    # data.eval_split. A row with another name is an error (a typo must not drop a test image).
    splits: list[str] = field(default_factory=list)


@dataclass
class ClassifierConfig:
    arch: Literal["ddpm_unet", "smp"] = "ddpm_unet"
    init: Literal["pretrained", "scratch", "imagenet", "regressor"] = "pretrained"
    # DDPM export/ (ddpm_unet), SSL export/ (smp), a fine-tuning run / its best/ (regressor)
    pretrained_path: str = ""
    preset: str = "tiny"                # ddpm_unet scratch without pretrained_path
    timestep_mode: Literal["fixed", "drop"] = "fixed"
    timestep: int = ranged(0, ">= 0")
    encoder: str = "resnet18"           # smp encoder name
    imagenet_weights: str = ""          # init=imagenet offline: state-dict file / folder
    gray_adapter: Literal["repeat", "in_channels", "colorize"] = "repeat"
    input_norm: Literal["auto", "imagenet", "none"] = "auto"
    freeze: Literal["none", "encoder"] = "none"
    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = ranged(256, ">= 1")  # mlp head
    dropout: float = ranged(0.0, "[0, 1)")
    feature_norm: bool = True           # BatchNorm1d (no affine) on the pooled features


@dataclass
class ClassLossConfig:
    # "none" = plain cross-entropy; "balanced" = n / (K n_k) over the training images (the
    # usual inverse-frequency rule); or one weight per class, in the order of the classes.
    class_weights: Union[Literal["none", "balanced"], list[float]] = ranged("none", "> 0")
    label_smoothing: float = ranged(0.0, "[0, 1)")


@dataclass
class ClassEvalConfig:
    batch_size: int = ranged(32, ">= 1")  # inference batch (validation and evaluate-classifier)
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
