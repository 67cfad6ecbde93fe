"""Scoliosis severity labels of the AASCE 2019 spine set, derived from its Cobb angles.

    python experiments/classification/make_cobb_labels.py [SPINE_ROOT] [OUT_CSV]

SPINE_ROOT defaults to $DDPM_LANDMARKS_DATA/aasce2019_spine (DDPM_LANDMARKS_DATA default ./data),
OUT_CSV to runs/classification/aasce_cobb_labels.csv. The label of an image is `severe` when its
largest Cobb angle, max(angle_PT, angle_MT, angle_TL) of cobb_angles.csv (proximal thoracic,
main thoracic, thoracolumbar; the challenge's ground truth from the vertebra corners), is at
least 40 degrees, else `not_severe` (the usual boundary of severe scoliosis; it also splits
the set near half and half: 201 / 481 training and 65 / 128 test images are severe). The
split is left to the dataset (manifest: training / test); the 98 unlabelled challenge images
have no angle and no row. Written atomically; nothing of the data is copied.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from ddpm_landmarks.utils.atomic import atomic_write_text
from ddpm_landmarks.utils.paths import data_dir

THRESHOLD_DEG = 40.0
ANGLES = ("angle_PT", "angle_MT", "angle_TL")


def write_cobb_labels(spine_root: str | Path, out_csv: str | Path,
                      threshold: float = THRESHOLD_DEG) -> Path:
    source = Path(spine_root) / "cobb_angles.csv"
    if not source.is_file():
        raise SystemExit(f"error: {source} not found (the AASCE 2019 spine folder)")
    rows = ["image,label"]
    with open(source, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                worst = max(float(row[k]) for k in ANGLES)
            except (KeyError, TypeError, ValueError):
                raise SystemExit(f"error: {source} line {line}: expected numeric "
                                 f"{', '.join(ANGLES)}") from None
            rows.append(f"{row['image']},{'severe' if worst >= threshold else 'not_severe'}")
    return atomic_write_text(Path(out_csv), "\n".join(rows) + "\n")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else data_dir() / "aasce2019_spine"
    out = sys.argv[2] if len(sys.argv) > 2 else "runs/classification/aasce_cobb_labels.csv"
    print(write_cobb_labels(root, out))
