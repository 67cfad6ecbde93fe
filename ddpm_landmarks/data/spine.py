"""AASCE 2019 / SpineWeb 16 AP spine radiographs (Wu et al., MICCAI 2017) in the shared CSV
layout (../shared/data/aasce2019_spine, read by ddpm_landmarks.data.generic).

68 landmarks: the 4 corners of each of the 17 vertebral bodies T1..T12, L1..L5, index
4 * v + c with corners c = 0 upper-left, 1 upper-right, 2 lower-left, 3 lower-right, where left
and right are IMAGE left/right (landmark_names.csv says so). A horizontal flip therefore swaps
4v+0 <-> 4v+1 and 4v+2 <-> 4v+3: FLIP_PERMUTATION.

Splits: `training` (481) and `test` (128). The 98 `unlabeled_challenge_test` images have no
landmarks: they are not records, only names in `dataset.unlabeled` (pretraining pool material).

No pixel spacing is known (the manifest says `unknown`): errors are in ORIGINAL pixels (unit
"px"). SDR thresholds 5, 10, 20 px: the original films are ~1000 x 2500 px with vertebral
bodies roughly 50-100 px wide, so these are about 5 %, 10 % and 20 % of a vertebra's width --
the same spirit as 2-4 mm on a 40 mm cephalometric structure.
"""
from __future__ import annotations

from pathlib import Path

from ddpm_landmarks.data.generic import read_landmark_folder
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.errors import DataError

VERTEBRAE = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
CORNERS = ("upper-left", "upper-right", "lower-left", "lower-right")
NUM_LANDMARKS = 4 * len(VERTEBRAE)          # 68
LANDMARK_NAMES = [f"{v} {c}" for v in VERTEBRAE for c in CORNERS]
# Corners per vertebra under a horizontal flip: UL<->UR, LL<->LR.
FLIP_PERMUTATION = [4 * v + c for v in range(len(VERTEBRAE)) for c in (1, 0, 3, 2)]
SDR_THRESHOLDS_PX = (5.0, 10.0, 20.0)
SPLITS = ("training", "test")


def read_aasce_spine(root: str | Path, on_bad: str = "error") -> LandmarkDataset:
    root = Path(root).expanduser()
    dataset = read_landmark_folder(root, "landmarks.csv", name="aasce_spine",
                                   num_landmarks=NUM_LANDMARKS, on_bad=on_bad,
                                   landmark_names=LANDMARK_NAMES,
                                   flip_permutation=FLIP_PERMUTATION,
                                   sdr_thresholds_mm=SDR_THRESHOLDS_PX, unit="px")
    # Landmarks for an image the manifest calls unlabelled contradict each other: say so.
    odd = sorted({r.split for r in dataset.records if r.split.startswith("unlabeled")})
    if odd:
        raise DataError(f"aasce_spine: images with landmarks in split(s) {odd} "
                        f"of {root / 'manifest.csv'}")
    return dataset
