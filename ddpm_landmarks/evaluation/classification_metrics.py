"""Classification metrics: accuracy, balanced accuracy, one-vs-rest ROC AUC, confusion matrix.

    summary = classification_summary(y_true, probabilities, classes)
    write_classification_results(out_dir, names, y_true, probabilities, classes, summary)
    print(format_classification_summary(summary, "run on test"))

ROC AUC is the Mann-Whitney statistic: the probability that a random positive scores higher
than a random negative, ties counting one half,

    AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-)

with R+ the sum of the positives' ranks among all scores, tied scores given their mean rank
(midranks). It equals the trapezoidal area under the empirical ROC curve (sklearn's
roc_auc_score), needs no threshold, and is undefined (NaN) when the set has no positive or no
negative. Per class: one-vs-rest on that class's probability; macro AUC = the mean over the
classes where it is defined (the count is reported). Balanced accuracy = the mean recall over
the classes present in y_true (sklearn's definition). Predictions are the argmax of the
probabilities (ties -> the lower class index).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.utils.atomic import atomic_write_text


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1                 # rank of each distinct value's first
    return (first + (counts - 1) / 2.0)[inverse]


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Mann-Whitney ROC AUC of `scores` for the boolean labels `positive`; NaN if one side is
    empty. Non-finite scores are an error (a NaN would rank arbitrarily)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"{scores.shape[0]} scores for {positive.shape[0]} labels")
    if not np.isfinite(scores).all():
        raise ValueError("ROC AUC of non-finite scores")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = midranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _nan_to_none(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def classification_summary(y_true: Sequence[int], probabilities: np.ndarray,
                           classes: Sequence[str]) -> dict:
    """Every metric of the module doc, as a JSON-ready dict (undefined values are None)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape != (y.size, k):
        raise ValueError(f"probabilities of shape {p.shape} for {y.size} images and {k} classes")
    if y.size == 0:
        raise ValueError("no images to score")
    if (y < 0).any() or (y >= k).any():
        raise ValueError(f"class indices outside 0..{k - 1}")
    pred = p.argmax(axis=1)
    matrix = confusion_matrix(y, pred, k)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(matrix) / support
        precision = np.diag(matrix) / predicted
    aucs = [roc_auc(p[:, j], y == j) for j in range(k)]
    defined = [a for a in aucs if math.isfinite(a)]
    per_class = {str(c): {"support": int(support[j]), "recall": _nan_to_none(recall[j]),
                          "precision": _nan_to_none(precision[j]), "auc": _nan_to_none(aucs[j])}
                 for j, c in enumerate(classes)}
    return {
        "n": int(y.size),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.nanmean(recall[support > 0])),
        "macro_auc": float(np.mean(defined)) if defined else None,
        "auc_classes": len(defined),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": [str(c) for c in classes],
        "predicted": pred.tolist(),
    }


def predictions_csv(names: Sequence[str], y_true: Sequence[int], probabilities: np.ndarray,
                    classes: Sequence[str]) -> str:
    """image,true,predicted,p_<class>... with class names (not indices) in true / predicted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "true", "predicted", *[f"p_{c}" for c in classes]])
    for name, truth, probs in zip(names, y_true, np.asarray(probabilities, dtype=np.float64)):
        writer.writerow([name, classes[int(truth)], classes[int(probs.argmax())],
                         *[f"{v:.6f}" for v in probs]])
    return buf.getvalue()


def write_classification_results(out_dir: str | Path, names: Sequence[str],
                                 y_true: Sequence[int], probabilities: np.ndarray,
                                 classes: Sequence[str], summary: dict,
                                 extra: Optional[dict] = None) -> Path:
    """out_dir/metrics.json (summary without the per-image predictions, plus `extra`) and
    out_dir/predictions.csv, each written atomically."""
    out_dir = Path(out_dir)
    metrics = {**(extra or {}), **{k: v for k, v in summary.items() if k != "predicted"}}
    atomic_write_text(out_dir / "predictions.csv",
                      predictions_csv(names, y_true, probabilities, classes))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out_dir


def _fmt(value: Optional[float], percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def format_classification_summary(summary: dict, title: str) -> str:
    """A Markdown table of the headline numbers, per-class AUC / recall and the confusion
    matrix."""
    lines = [title, "| accuracy | balanced accuracy | macro AUC | n |", "|---|---|---|---|",
             f"| {_fmt(summary['accuracy'], True)} | {_fmt(summary['balanced_accuracy'], True)} "
             f"| {_fmt(summary['macro_auc'])} | {summary['n']} |", "",
             "| class | support | recall | precision | AUC (one vs rest) |",
             "|---|---|---|---|---|"]
    for name, c in summary["per_class"].items():
        lines.append(f"| {name} | {c['support']} | {_fmt(c['recall'], True)} | "
                     f"{_fmt(c['precision'], True)} | {_fmt(c['auc'])} |")
    classes = summary["classes"]
    lines += ["", "confusion matrix (rows true, columns predicted)",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, summary["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)
