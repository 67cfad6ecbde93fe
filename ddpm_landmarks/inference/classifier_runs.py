"""A finished classification run, scored on a labelled split (`ddpm-landmarks evaluate-classifier`).

    summary = evaluate_classifier_run("runs/cobb_ddpm", split="test")   # RUN/eval_test/

The run's own config.yaml is the reference (label file, image grid, resize mode); dotted
overrides change what may differ at test time (data.root, labels.file, eval.batch_size, ...).
The classes are the ones saved with the weights: a label file that has other classes is an
error, never a silent re-indexing of the logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpm_landmarks.config.classify import ClassifyConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.class_labels import ClassificationImages, load_label_task
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.evaluation.classification_metrics import (
    classification_summary,
    write_classification_results,
)
from ddpm_landmarks.methods.classification import predict_logits, softmax
from ddpm_landmarks.models.artifacts import weights_folder
from ddpm_landmarks.models.classifier import load_classifier


def evaluate_classifier_run(run_dir: str | Path, split: Optional[str] = None,
                            weights: str = "best", overrides: Sequence[str] = (),
                            out_dir: Optional[Path] = None,
                            device: Optional[str] = None) -> dict:
    """Predict `split` (default data.eval_split) and write metrics.json + predictions.csv into
    out_dir (default RUN/eval_<split>); returns the summary plus "out_dir", "weights"."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a classification run folder (no config.yaml)")
    cfg = load_config(config_file, list(overrides), cls=ClassifyConfig)
    split = split or cfg.data.eval_split
    try:
        weights_dir = weights_folder(run_dir, "classifier", weights, "run")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, classes = load_classifier(weights_dir, map_location=dev)
    task = load_label_task(cfg.labels, cfg.data, extra_splits=[split])
    if task.classes != classes:
        unknown = sorted(set(task.classes) - set(classes))
        if unknown:
            raise DataError(f"{task.source}: classes {unknown} were not trained by "
                            f"{weights_dir} (its classes: {classes})")
        task.classes = classes          # a subset of the trained classes: score in their order
    images = task.split(split)
    data = ClassificationImages(images, task, cfg.data, cfg.augment, train=False)
    logits, labels = predict_logits(model.eval(), data, cfg.eval.batch_size, dev)
    probabilities = softmax(logits)
    summary = classification_summary(labels, probabilities, classes)
    out_dir = Path(out_dir) if out_dir else run_dir / f"eval_{split}"
    extra = {"run": str(run_dir), "weights": str(weights_dir), "split": split,
             "label_file": str(task.source), "images": len(images)}
    write_classification_results(out_dir, [i.name for i in images], labels, probabilities,
                                 classes, summary, extra=extra)
    return {**summary, **extra, "out_dir": out_dir}
