"""A synthetic classification task: the synthetic x-rays with 0, 1 or 2 lead markers.

Radiographs carry small dense markers (the technician's L/R letters); here each synthetic image
(data/synthetic.py) gets `label` = the number of bright square markers (0, 1 or 2, a third of
the images each, seeded) burnt into distinct corners of the image, where there is only
background. The label is visible in the image and needs no landmark knowledge, so a short
training of any encoder must beat chance (1/3) clearly; it is the built-in task of
`ddpm-landmarks classify` when `labels.file` is empty and `data.dataset=synthetic`.

Written once, next to the synthetic set it is made from (`<synthetic root>_markers/`: images/
and labels.csv with `image,label,split`, the synthetic split kept), atomically; generated on
first use like the synthetic set itself.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.data.synthetic import (
    build_synthetic_dataset,
    default_cache_dir,
    spec_from_config,
)
from ddpm_landmarks.utils.atomic import directory_once
from ddpm_landmarks.utils.paths import expand_path

MARKER_VERSION = 1
MARKER_SIDE = 0.1             # marker side as a fraction of the image side
MARKER_MARGIN = 0.04          # distance of a marker from the image border, same unit
MARKER_VALUE = 1.0
NUM_CLASSES = 3               # 0, 1 or 2 markers


def add_markers(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` filled squares in distinct corners (chosen by rng) of a float [0, 1] image."""
    h, w = image.shape
    side = max(2, int(round(MARKER_SIDE * min(h, w))))
    margin = int(round(MARKER_MARGIN * min(h, w)))
    corners = [(margin, margin), (w - margin - side, margin), (margin, h - margin - side),
               (w - margin - side, h - margin - side)]
    out = image.copy()
    for corner in rng.permutation(len(corners))[:count]:
        x, y = corners[corner]
        out[y:y + side, x:x + side] = MARKER_VALUE
    return out


def marker_task_dir(data: DataConfig) -> Path:
    spec = spec_from_config(data)
    base = expand_path(data.root) if data.root else default_cache_dir() / f"synthetic_{spec.key()}"
    return base.parent / f"{base.name}_markers_v{MARKER_VERSION}"


def synthetic_marker_task(labels_cfg, data: DataConfig):
    """(labels config, data config) pointing at the marker task of `data`'s synthetic set,
    generated first if needed. The labels config keeps its splits and val_split."""
    out = marker_task_dir(data)
    if not (out / "labels.csv").is_file():
        dataset = build_synthetic_dataset(data)
        rng = np.random.default_rng(data.synthetic_seed + 7_777)
        counts = rng.permutation(np.arange(len(dataset)) % NUM_CLASSES)
        with directory_once(out) as tmp:      # several ranks may get here at once
            (tmp / "images").mkdir()
            rows = ["image,label,split"]
            for record, count in zip(dataset.records, counts):
                image = add_markers(read_image(record.image_path), int(count), rng)
                cv2.imwrite(str(tmp / "images" / record.image_path.name),
                            np.round(image * 255).astype(np.uint8))
                rows.append(f"{record.image_path.name},{int(count)},{record.split}")
            (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
            (tmp / "task.json").write_text(json.dumps(
                {"task": "number of bright square markers", "classes": list(range(NUM_CLASSES)),
                 "version": MARKER_VERSION, "synthetic": dataclasses.asdict(spec_from_config(data))},
                indent=2))
    labels = dataclasses.replace(labels_cfg, file=str(out / "labels.csv"),
                                 images=str(out / "images"), image_column="image",
                                 label_column="label", split_column="split")
    return labels, data
