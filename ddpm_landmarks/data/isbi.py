"""ISBI 2015 cephalometric challenge (Wang et al., MedIA 2016): 400 lateral cephalograms,
1935 x 2400 px at 0.1 mm/px, 19 landmarks annotated by two doctors.

Two layouts, told apart by what the folder holds:

- "raw", the challenge release: `RawImage/<any subfolder>/NNN.bmp` (TrainingData, Test1Data,
  Test2Data) and `AnnotationsByMD/{400_senior,400_junior}/NNN.txt`: 19 lines `x,y` in integer
  original pixels (pixel centres), then lines that are not landmarks (class labels), ignored.
  The split comes from the image NUMBER, the official partition: 1-150 train, 151-300 test1,
  301-400 test2 (so a copy with every BMP in one folder still splits correctly).
- "csv", the shared conversion (../shared/data/isbi2015): `images/`, `manifest.csv` (orig
  size, orig_spacing_mm, split train/test1) and `landmarks_<ground_truth>.csv`, read by
  ddpm_landmarks.data.generic (exact original pixels from `orig_coords/` when present).

Ground truth (DataConfig.ground_truth):
- senior / junior: one doctor's points.
- mean: the average of the two doctors, the usual ground truth of later papers (Payer et al.,
  Lindner et al.) and of this project.
- challenge: in the csv layout, the file `landmarks_challenge.csv`. In the raw layout it is the
  SENIOR doctor's annotation: the shared landmarks_challenge.csv equals landmarks_senior.csv on
  all 300 images (checked when this reader was written; tests/test_readers.py re-checks it), so
  senior is what "challenge" denotes there too.

Cephalograms are lateral views with no left/right landmark pairs: no flip permutation.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ddpm_landmarks.data.generic import BadSamples, parse_float, read_landmark_folder
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.errors import DataError

log = logging.getLogger(__name__)

NUM_LANDMARKS = 19
SPACING_MM = (0.1, 0.1)
SDR_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)
GROUND_TRUTHS = ("senior", "junior", "mean", "challenge")
LANDMARK_NAMES = [
    "Sella", "Nasion", "Orbitale", "Porion", "Subspinale (A)", "Supramentale (B)", "Pogonion",
    "Menton", "Gnathion", "Gonion", "Lower incisal incision", "Upper incisal incision",
    "Upper lip", "Lower lip", "Subnasale", "Soft tissue pogonion", "Posterior nasal spine",
    "Anterior nasal spine", "Articulare",
]
# Official partition by image number (inclusive ranges).
SPLITS = (("train", 1, 150), ("test1", 151, 300), ("test2", 301, 400))
ANNOTATORS = {"senior": "400_senior", "junior": "400_junior"}


def split_of(number: int) -> Optional[str]:
    for name, lo, hi in SPLITS:
        if lo <= number <= hi:
            return name
    return None


def detect_layout(root: Path) -> str:
    """'raw' (RawImage/ + AnnotationsByMD/) or 'csv' (landmarks_*.csv); DataError otherwise."""
    if (root / "RawImage").is_dir() and (root / "AnnotationsByMD").is_dir():
        return "raw"
    if any(root.glob("landmarks*.csv")):
        return "csv"
    raise DataError(f"isbi2015: {root} is neither the challenge layout (RawImage/ and "
                    f"AnnotationsByMD/400_senior/) nor the CSV layout (images/, manifest.csv, "
                    f"landmarks_<ground_truth>.csv)")


def read_annotation_txt(path: Path, num_landmarks: int = NUM_LANDMARKS) -> np.ndarray:
    """The first `num_landmarks` lines `x,y` of a challenge annotation file -> (K, 2) float64."""
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read annotation file: {err}") from None
    if len(lines) < num_landmarks:
        raise DataError(f"{path} line {len(lines) + 1}: file ends after {len(lines)} lines, "
                        f"expected {num_landmarks} lines 'x,y'")
    points = np.empty((num_landmarks, 2), dtype=np.float64)
    for i in range(num_landmarks):
        where = f"{path} line {i + 1}"
        fields = lines[i].strip().split(",")
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'x,y' (landmark {i}), found {lines[i]!r}")
        points[i] = [parse_float(f.strip(), where) for f in fields]
    return points


def _read_raw(root: Path, ground_truth: str, on_bad: str) -> LandmarkDataset:
    bad = BadSamples(on_bad, "isbi2015", log)
    needed = ["senior", "junior"] if ground_truth == "mean" else \
        ["senior" if ground_truth == "challenge" else ground_truth]
    for who in needed:
        folder = root / "AnnotationsByMD" / ANNOTATORS[who]
        if not folder.is_dir():
            raise DataError(f"isbi2015: annotation folder not found: {folder} "
                            f"(needed for ground truth '{ground_truth}')")
    images = sorted((p for p in (root / "RawImage").rglob("*") if p.suffix.lower() == ".bmp"),
                    key=lambda p: (p.stem, str(p)))           # by number, whatever the folder
    if not images:
        raise DataError(f"isbi2015: no .bmp images under {root / 'RawImage'}")

    records: list[Record] = []
    seen: dict[str, Path] = {}
    for path in images:
        try:
            if not re.fullmatch(r"\d+", path.stem):
                raise DataError(f"{path}: image name is not the challenge's NNN.bmp")
            split = split_of(int(path.stem))
            if split is None:
                raise DataError(f"{path}: image number {int(path.stem)} outside 1-400")
            if path.stem in seen:
                raise DataError(f"{path}: image {path.stem} also at {seen[path.stem]}")
            seen[path.stem] = path
            annotations = []
            for who in needed:
                txt = root / "AnnotationsByMD" / ANNOTATORS[who] / f"{path.stem}.txt"
                if not txt.is_file():
                    raise DataError(f"{txt}: annotation of {path} not found")
                annotations.append(read_annotation_txt(txt))
        except DataError as err:
            bad.report(path.stem, str(err))
            continue
        points = np.mean(annotations, axis=0)   # mean of the doctors, or the one doctor
        records.append(Record(id=path.stem, image_path=path, landmarks=points,
                              spacing_mm=SPACING_MM, original_size=None, split=split,
                              meta={"ground_truth": ground_truth}))
    dataset = LandmarkDataset("isbi2015", records, NUM_LANDMARKS, LANDMARK_NAMES, None,
                              SDR_THRESHOLDS_MM, "mm")
    return bad.attach(dataset)


def read_isbi2015(root: str | Path, ground_truth: str = "mean", on_bad: str = "error",
                  layout: Optional[str] = None) -> LandmarkDataset:
    """ISBI 2015 in either layout (autodetected unless `layout` is 'raw' or 'csv')."""
    root = Path(root).expanduser()
    if ground_truth not in GROUND_TRUTHS:
        raise DataError(f"isbi2015: unknown ground truth {ground_truth!r}; "
                        f"valid: {', '.join(GROUND_TRUTHS)}")
    if not root.is_dir():
        raise DataError(f"isbi2015: dataset folder not found: {root}")
    layout = layout or detect_layout(root)
    if layout == "raw":
        return _read_raw(root, ground_truth, on_bad)
    if layout != "csv":
        raise DataError(f"isbi2015: unknown layout {layout!r} (raw or csv)")
    landmarks_file = f"landmarks_{ground_truth}.csv"
    if not (root / landmarks_file).is_file():
        found = sorted(p.name for p in root.glob("landmarks*.csv"))
        raise DataError(f"isbi2015: {root / landmarks_file} not found (ground truth "
                        f"'{ground_truth}'); the folder has {found}")
    return read_landmark_folder(root, landmarks_file, name="isbi2015",
                                num_landmarks=NUM_LANDMARKS, on_bad=on_bad,
                                default_spacing_mm=SPACING_MM, landmark_names=LANDMARK_NAMES,
                                flip_permutation=None, sdr_thresholds_mm=SDR_THRESHOLDS_MM)
