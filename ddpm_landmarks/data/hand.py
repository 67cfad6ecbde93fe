"""Digital Hand Atlas (Gertych et al.) with Payer et al.'s 37 landmarks (MedIA 2019).

Layout (Payer's release; the shared copy is ../shared/data/hand_dha):
    root/all.csv  (or payer_all.csv, setup/all.csv)   no header; `id,x0,y0,...,x36,y36` in
                                                        original pixels (pixel centres)
    root/images/<id>.<ext>                              any of IMAGE_SUFFIXES
    root/manifest.csv   optional                        image,orig_w,orig_h[,new_w,new_h]: the
                                                        file is a resampled copy of that grid
    root/payer_cv/set{1,2,3}/{train,test}.txt           (or cv/, setup/cv/) one id per line

Rows of all.csv whose image is absent are not records (the DHA has 910 annotated images; a
copy may hold only some): their ids are kept in `dataset.absent_ids` and counted in the log.

Splits: `cv{k}_train` / `cv{k}_test` are Payer's three cross-validation folds. A record has one
`split`, that of the fold chosen with `cv_set`; its memberships in all folds are in
meta["cv_splits"], and `cv_split(dataset, "cv2_test")` selects any of them.

Spacing: the DHA has no physical pixel spacing (the .mha ElementSpacing is not a detector
spacing). Payer et al. follow the wrist-width rule: the distance between the two ends of the
wrist, landmarks 1 and 5 of the 0-based list (his code's `normalization_indizes=[1, 5]`), is
taken as 50 mm, so the isotropic spacing is 50 / distance mm per original pixel. This is the
ElementSpacing Payer wrote into his .mha files (equal to 5 decimals on every shared image) and
the column `mm_per_orig_px_wrist50` of the shared manifest; tests/test_readers.py checks both.
An earlier version used (0, 4), which reports every error ~6 % (up to 15 %) too small.
DataConfig.wrist_landmarks changes the pair. Spacing is None when either point is missing.

A horizontal flip of a left hand gives a right hand, which the dataset never shows; no flip
permutation is offered.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.data.generic import BadSamples, parse_float, read_manifest
from ddpm_landmarks.data.image_io import IMAGE_SUFFIXES
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.errors import DataError

log = logging.getLogger(__name__)

NUM_LANDMARKS = 37
SDR_THRESHOLDS_MM = (2.0, 4.0, 10.0)
WRIST_WIDTH_MM = 50.0
WRIST_LANDMARKS = (1, 5)          # 0-based, Payer's normalization_indizes
ANNOTATION_FILES = ("all.csv", "payer_all.csv", "setup/all.csv")
CV_FOLDERS = ("payer_cv", "cv", "setup/cv")


def wrist_spacing(points: np.ndarray, wrist_landmarks: Sequence[int] = WRIST_LANDMARKS
                  ) -> Optional[tuple[float, float]]:
    """(s, s) with s = 50 mm / distance between the two wrist landmarks; None if one is missing."""
    a, b = (points[i] for i in wrist_landmarks)
    if np.isnan(a).any() or np.isnan(b).any():
        return None
    distance = float(np.hypot(*(a - b)))
    if distance == 0:
        raise DataError(f"wrist landmarks {tuple(wrist_landmarks)} coincide: no spacing")
    s = WRIST_WIDTH_MM / distance
    return (s, s)


def read_payer_csv(path: Path, bad: BadSamples, num_landmarks: int = NUM_LANDMARKS
                   ) -> dict[str, tuple[np.ndarray, int]]:
    """{id: ((K, 2) original-pixel points, line)}; an empty x and y pair = missing."""
    out: dict[str, tuple[np.ndarray, int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            where, ident = f"{path} line {line}", row[0].strip()
            try:
                if len(row) != 1 + 2 * num_landmarks:
                    raise DataError(f"{where}: expected id + {2 * num_landmarks} coordinates "
                                    f"({num_landmarks} landmarks), found {len(row)} fields")
                if not ident:
                    raise DataError(f"{where}: empty image id")
                if ident in out:
                    raise DataError(f"{where}: duplicate row for image {ident} "
                                    f"(first at line {out[ident][1]})")
                values = [c.strip() for c in row[1:]]
                points = np.full((num_landmarks, 2), np.nan)
                for i in range(num_landmarks):
                    xt, yt = values[2 * i], values[2 * i + 1]
                    if xt == "" and yt == "":
                        continue
                    points[i] = [parse_float(xt, where), parse_float(yt, where)]
            except DataError as err:
                bad.report(ident or f"{path}:{line}", str(err))
                continue
            out[ident] = (points, line)
    return out


def read_cv_folds(folder: Path) -> dict[str, list[str]]:
    """{id: ["cv1_train", "cv2_test", ...]} from set{k}/{train,test}.txt."""
    member: dict[str, list[str]] = {}
    for set_dir in sorted(folder.glob("set*")):
        match = re.fullmatch(r"set(\d+)", set_dir.name)
        if not match:
            continue
        k = match.group(1)
        fold: dict[str, set[str]] = {}
        for part in ("train", "test"):
            path = set_dir / f"{part}.txt"
            if not path.is_file():
                raise DataError(f"hand_dha: cross-validation file not found: {path}")
            fold[part] = {t.strip() for t in path.read_text().splitlines() if t.strip()}
            for ident in sorted(fold[part]):
                member.setdefault(ident, []).append(f"cv{k}_{part}")
        leak = fold["train"] & fold["test"]
        if leak:
            raise DataError(f"hand_dha: {set_dir} has ids in both train and test: "
                            f"{sorted(leak)[:5]}")
    return member


def _find(root: Path, candidates: Sequence[str]) -> Optional[Path]:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def read_hand_dha(root: str | Path, *, wrist_landmarks: Sequence[int] = WRIST_LANDMARKS, cv_set: int = 1,
                  on_bad: str = "error", images_dir: str = "images",
                  manifest_file: str = "manifest.csv") -> LandmarkDataset:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"hand_dha: dataset folder not found: {root}")
    if len(wrist_landmarks) != 2 or not all(0 <= i < NUM_LANDMARKS for i in wrist_landmarks):
        raise DataError(f"hand_dha: wrist_landmarks must be two indices in 0..{NUM_LANDMARKS - 1},"
                        f" got {tuple(wrist_landmarks)}")
    csv_path = _find(root, ANNOTATION_FILES)
    if csv_path is None:
        raise DataError(f"hand_dha: no annotation file in {root} (looked for "
                        f"{', '.join(ANNOTATION_FILES)})")
    image_root = root / images_dir
    if not image_root.is_dir():
        raise DataError(f"hand_dha: image folder not found: {image_root}")
    bad = BadSamples(on_bad, "hand_dha", log)
    annotations = read_payer_csv(csv_path, bad)

    files: dict[str, Path] = {}
    for p in sorted(image_root.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in files:
                raise DataError(f"hand_dha: two images for id {p.stem}: {files[p.stem]}, {p}")
            files[p.stem] = p
    manifest_path = root / manifest_file
    manifest = read_manifest(manifest_path, bad) if manifest_path.is_file() else None
    if manifest is not None:
        for image, row in manifest.items():
            if Path(image).stem not in files:
                bad.report(Path(image).stem, f"{manifest_path} line {row.line}: image file not "
                                             f"found: {image_root / image}")
    cv_folder = _find(root, CV_FOLDERS)
    folds = read_cv_folds(cv_folder) if cv_folder is not None else {}
    chosen = (f"cv{cv_set}_train", f"cv{cv_set}_test")
    if folds and not any(s in chosen for v in folds.values() for s in v):
        raise DataError(f"hand_dha: no cross-validation set {cv_set} in {cv_folder}")

    records, absent = [], []
    for ident, (points, line) in annotations.items():
        if ident in bad:
            continue
        path = files.get(ident)
        if path is None:
            absent.append(ident)
            continue
        where = f"{csv_path} line {line}"
        try:
            original_size = None
            if manifest is not None:
                row = manifest.get(path.name)
                if row is None:
                    raise DataError(f"{where}: image {path.name} has no row in {manifest_path}")
                original_size = row.orig_size
            try:
                spacing = wrist_spacing(points, wrist_landmarks)
            except DataError as err:
                raise DataError(f"{where}: image {ident}: {err}") from None
        except DataError as err:
            bad.report(ident, str(err))
            continue
        if spacing is None:
            log.warning("%s: image %s lacks a wrist landmark %s: spacing unknown",
                        where, ident, tuple(wrist_landmarks))
        member = folds.get(ident, [])
        split = next((s for s in member if s in chosen), "")
        records.append(Record(id=ident, image_path=path, landmarks=points, spacing_mm=spacing,
                              original_size=original_size, split=split,
                              meta={"cv_splits": list(member)}))
    if absent:
        log.info("hand_dha: %d of %d annotated images are absent from %s (not records)",
                 len(absent), len(annotations), image_root)
    dataset = LandmarkDataset("hand_dha", records, NUM_LANDMARKS, None, None,
                              SDR_THRESHOLDS_MM, "mm")
    dataset.absent_ids = absent
    dataset.unlabeled = sorted(set(files) - set(annotations))
    return bad.attach(dataset)


def cv_split(dataset: LandmarkDataset, name: str) -> LandmarkDataset:
    """Records of any fold (e.g. "cv2_test"), whichever fold set their `split`."""
    ids = [r.id for r in dataset.records if name in r.meta.get("cv_splits", [])]
    if not ids:
        raise DataError(f"{dataset.name}: no images in cross-validation split '{name}'")
    return dataset.subset(ids, f"{dataset.name}:{name}")
