"""Image classification as a method of the shared engine (training/engine.py).

    method = ClassificationMethod(model, classes, class_weights=None, label_smoothing=0.0)
    loss, logs = method.loss(model, batch)        # batch: ClassificationImages items collated
    # validation: training/validation.py classification_validator

loss = cross-entropy of the logits (float32) with optional class weights and label smoothing;
logs the batch accuracy. Validation (main process, eval mode, under the EMA weights when there
is an EMA) predicts the validation images and returns val/loss (cross-entropy with the class
weights, no smoothing), val/accuracy, val/balanced_accuracy, val/auc (macro one-vs-rest,
evaluation/classification_metrics.py) and the lower-is-better value the engine monitors
(config/classify.MONITOR_KEYS: val/loss, val/error, val/balanced_error, val/1-auc); the
validator is training/validation.py's classification_validator.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ddpm_landmarks.methods.base import Method
from ddpm_landmarks.models.classifier import save_classifier


def class_weights(spec: Union[str, Sequence[float]], labels: Sequence[int],
                  num_classes: int) -> Optional[torch.Tensor]:
    """None ("none"), n / (K n_k) over `labels` ("balanced"), or the given per-class list."""
    if isinstance(spec, str):
        if spec == "none":
            return None
        if spec == "balanced":
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
            if (counts == 0).any():
                raise ValueError("balanced class weights need every class among the training "
                                 "images")
            return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
        raise ValueError(f"loss.class_weights: unknown rule {spec!r}; valid: none, balanced, "
                         f"or a list of {num_classes} weights")
    weights = [float(w) for w in spec]
    if len(weights) != num_classes or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"loss.class_weights: {num_classes} positive weights needed (one per "
                         f"class, in class order), got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationMethod(Method):
    def __init__(self, model: torch.nn.Module, classes: Sequence[str],
                 class_weights: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model, self.classes = model, list(classes)
        self.class_weights, self.label_smoothing = class_weights, float(label_smoothing)

    def _weights(self, device: torch.device) -> Optional[torch.Tensor]:
        return None if self.class_weights is None else self.class_weights.to(device)

    def loss(self, model: torch.nn.Module, batch: dict,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        logits = model(batch["image"]).float()
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels, weight=self._weights(logits.device),
                               label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": accuracy}

    def log_images(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {}                       # nothing to draw beyond the input images

    def export(self, model: torch.nn.Module, out_dir: Path, config_dict: dict) -> None:
        save_classifier(model, out_dir, self.classes, config=config_dict)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data, batch_size: int,
                   device: Optional[torch.device] = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K) float64, labels (N,)) of every item of `data`, in order; the model is
    used as it is (call .eval() first)."""
    device = device or next(model.parameters()).device
    logits, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0):
        logits.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(logits).double().numpy(), torch.cat(labels).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
