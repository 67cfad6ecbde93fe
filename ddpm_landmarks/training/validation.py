"""The engine's validation hooks: validate(model) -> {"val/...": value}, lower is better for the
monitored key. The engine calls them on the main process under the EMA weights
(training/engine.py); they score with exactly the code `evaluate` uses.

    validate = landmark_validator(val_data, cfg)                  # fine-tuning
    validate = classification_validator(val_data, method, batch_size, monitor)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddpm_landmarks.config.classify import MONITOR_KEYS
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.evaluation.classification_metrics import classification_summary
from ddpm_landmarks.evaluation.evaluate import evaluate_predictions, ground_truths
from ddpm_landmarks.heatmaps.decoders import never_abstain
from ddpm_landmarks.inference.predictor import HeatmapPredictor, predict_dataset
from ddpm_landmarks.methods.classification import (
    ClassificationMethod,
    predict_logits,
    softmax,
)


def landmark_validator(val_data: HeatmapDataset, cfg: FinetuneConfig):
    """validate(model) -> {"val/mre", "val/sd", "val/sdr@t"..., "val/missed"} in the dataset's
    unit. Decoded without abstaining (decoders.never_abstain: every channel with location
    information gets a position, whatever its peak), so a model cannot improve its validation
    MRE by abstaining on hard landmarks; val/missed counts the rest (all-NaN or constant)."""
    decoder = never_abstain(cfg.decoder)
    truths = ground_truths(val_data.dataset)

    def validate(model) -> dict:
        predictor = HeatmapPredictor(model, cfg.loss, cfg.heatmap, decoder,
                                     val_data.dataset.flip_permutation, flip_tta=False)
        indices, points, _ = predict_dataset(predictor, val_data, cfg.eval.batch_size)
        assert indices == list(range(len(truths)))
        summary = evaluate_predictions(val_data.dataset, truths, points, cfg.eval)
        values = {"val/mre": summary["mre"], "val/sd": summary["sd"],
                  "val/missed": summary["missed"]}
        values.update({f"val/sdr@{t:g}": v for t, v in summary["sdr"].items()})
        return values

    return validate


def classification_validator(val_data, method: ClassificationMethod, batch_size: int,
                             monitor: str):
    """validate(model) -> {"val/loss", "val/accuracy", "val/balanced_accuracy", "val/auc",
    MONITOR_KEYS[monitor]} on `val_data`: the loss is the cross-entropy with the training class
    weights and no smoothing; the other keys are 1 - accuracy etc., lower is better."""
    if monitor not in MONITOR_KEYS:
        raise ValueError(f"eval.monitor: unknown {monitor!r}; valid: {', '.join(MONITOR_KEYS)}")
    if monitor == "auc" and len(set(val_data.labels)) < 2:
        raise ValueError("eval.monitor=auc needs validation images of at least 2 classes")

    def validate(model) -> dict:
        logits, labels = predict_logits(model, val_data, batch_size)
        weights = method.class_weights
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                               weight=None if weights is None else weights.double())
        summary = classification_summary(labels, softmax(logits), method.classes)
        auc = summary["macro_auc"]
        values = {"val/loss": float(loss), "val/accuracy": summary["accuracy"],
                  "val/balanced_accuracy": summary["balanced_accuracy"],
                  "val/auc": math.nan if auc is None else auc}
        values["val/error"] = 1.0 - values["val/accuracy"]
        values["val/balanced_error"] = 1.0 - values["val/balanced_accuracy"]
        values["val/1-auc"] = 1.0 - values["val/auc"]
        return values

    return validate
