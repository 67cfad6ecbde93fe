"""The generic labelled-folder layout, which any user can produce with a spreadsheet:

    root/
      images/<file>                 any of IMAGE_SUFFIXES
      landmarks.csv                 image,landmark_index,x,y   (0-based index; x, y in pixels of
                                    the image FILE; empty x and y = missing landmark)
      manifest.csv      optional    image[,orig_w,orig_h][,new_w,new_h][,spacing][,split]
      orig_coords/<stem>_orig.csv   optional: the same points in ORIGINAL pixels, used verbatim

Manifest columns: `orig_w,orig_h` say the file is a resampled copy of that original grid (the
landmarks are then mapped to it with the pixel-centre formula of sample.stored_to_original, or
taken exactly from orig_coords/ when present: re-deriving them from 3-decimal resized values
would add rounding); `new_w,new_h` is the file's own size (read from the image when absent).
Spacing, mm per ORIGINAL pixel: `spacing_mm_x,spacing_mm_y`, else `spacing_mm`, else
`orig_spacing_mm` (both isotropic); `unknown` or empty = None. `split` names the split.
Image names are paths relative to images/: an absolute path, a `..` component or a symlink
leading out of images/ is an error naming the file and line (record_checks.inside_folder).

The shared isbi2015, aasce2019_spine and hand_dha folders are this layout. Images with manifest
rows but no landmark rows (AASCE's unlabelled challenge test) are not records: they are listed in
`dataset.unlabeled`. Every problem is a DataError naming the file and line; with on_bad="skip"
the image concerned is left out, and the messages are kept in `dataset.skipped` and logged.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.data.dicom import read_dicom_spacing
from ddpm_landmarks.data.image_io import IMAGE_SUFFIXES, image_size, is_dicom
from ddpm_landmarks.data.record_checks import inside_folder
from ddpm_landmarks.data.sample import (
    LandmarkDataset,
    Record,
    original_to_stored,
    stored_to_original,
)
from ddpm_landmarks.errors import DataError

log = logging.getLogger(__name__)

UNKNOWN_VALUES = ("", "unknown", "none", "n/a", "na")
# orig_coords/ must agree with the resized CSV to this many resized pixels: a guard against a
# file from another dataset or ground truth, far above the 3-decimal rounding of the CSV.
ORIG_COORDS_TOLERANCE_PX = 0.5


class BadSamples:
    """Where per-image problems go: raised at once (on_bad="error") or collected (on_bad="skip")."""

    def __init__(self, on_bad: str, name: str, logger: logging.Logger = log):
        if on_bad not in ("error", "skip"):
            raise DataError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad, self.name, self.log = on_bad, name, logger
        self.messages: list[str] = []
        self.keys: dict[str, str] = {}      # image -> its first problem

    def report(self, key: str, message: str) -> None:
        if self.on_bad == "error":
            raise DataError(message)
        self.messages.append(message)
        self.keys.setdefault(key, message)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def attach(self, dataset: LandmarkDataset) -> LandmarkDataset:
        """Store the messages on the dataset and say how many images were skipped."""
        dataset.skipped = list(self.messages)
        dataset.skipped_names = dict(self.keys)
        if self.keys:
            self.log.warning("%s: skipped %d image(s) with bad data (on_bad='skip'); first problem: %s",
                        self.name, len(self.keys), self.messages[0])
        return dataset


def parse_float(text: str, where: str, what: str = "coordinate") -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: non-numeric {what} {text!r}") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: {what} {text!r} is not finite (leave it empty if missing)")
    return value


def read_points_csv(path: Path, bad: BadSamples, num_landmarks: Optional[int] = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Read an `image,landmark_index,x,y` file.

    Returns ({image: (K, 2) points, NaN = missing}, {image: line of its first row}, K). K is
    num_landmarks, or max index + 1 when None; every image must have exactly one row per index.
    """
    rows: dict[str, dict[int, tuple[float, float, int]]] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        need = ("image", "landmark_index", "x", "y")
        lacking = [c for c in need if c not in header]
        if lacking:
            raise DataError(f"{path} line 1: header {header} lacks columns {lacking} "
                            f"(expected image,landmark_index,x,y)")
        col = {c: header.index(c) for c in need}
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue                                    # blank line
            where = f"{path} line {line}"
            image = row[col["image"]].strip() if len(row) > col["image"] else ""
            key = image or f"{path}:{line}"
            try:
                if len(row) != len(header):
                    raise DataError(f"{where}: expected {len(header)} fields, found {len(row)}")
                if not image:
                    raise DataError(f"{where}: empty image name")
                text = row[col["landmark_index"]].strip()
                try:
                    index = int(text)
                except ValueError:
                    raise DataError(f"{where}: landmark index {text!r} is not an integer") from None
                if index < 0 or (num_landmarks is not None and index >= num_landmarks):
                    limit = f"0..{num_landmarks - 1}" if num_landmarks is not None else ">= 0"
                    raise DataError(f"{where}: landmark index {index} out of range ({limit})")
                xt, yt = row[col["x"]].strip(), row[col["y"]].strip()
                if xt == "" and yt == "":
                    x = y = float("nan")                     # the one spelling of "missing"
                elif xt == "" or yt == "":
                    raise DataError(f"{where}: only one of x, y is given (both empty = missing)")
                else:
                    x, y = parse_float(xt, where), parse_float(yt, where)
                seen = rows.setdefault(image, {})
                if index in seen:
                    raise DataError(f"{where}: duplicate row for image {image} landmark {index} "
                                    f"(first at line {seen[index][2]})")
            except DataError as err:
                bad.report(key, str(err))
                continue
            seen[index] = (x, y, line)
            first_line.setdefault(image, line)

    k = num_landmarks
    if k is None:
        k = 1 + max((i for r in rows.values() for i in r), default=-1)
    points: dict[str, np.ndarray] = {}
    for image, by_index in rows.items():
        if image in bad:
            continue
        if sorted(by_index) != list(range(k)):
            absent = sorted(set(range(k)) - set(by_index))
            bad.report(image, f"{path} line {first_line[image]}: image {image} has "
                              f"{len(by_index)} landmark rows, expected {k} (indices 0..{k - 1}; "
                              f"absent: {absent[:10]})")
            continue
        points[image] = np.array([by_index[i][:2] for i in range(k)], dtype=np.float64)
    return points, first_line, k


@dataclass
class ManifestRow:
    line: int
    orig_size: Optional[tuple[int, int]] = None     # None = the file is the original grid
    stored_size: Optional[tuple[int, int]] = None   # new_w, new_h when the manifest says
    spacing_mm: Optional[tuple[float, float]] = None
    has_spacing: bool = False                       # a spacing column exists (even if unknown)
    split: str = ""


def _optional_float(text: str, where: str, what: str) -> Optional[float]:
    if text.strip().lower() in UNKNOWN_VALUES:
        return None
    value = parse_float(text.strip(), where, what)
    if value <= 0:
        raise DataError(f"{where}: {what} must be positive, got {text!r}")
    return value


def _size(row: dict, wcol: str, hcol: str, where: str) -> Optional[tuple[int, int]]:
    if wcol not in row and hcol not in row:
        return None
    try:
        w, h = int(row.get(wcol) or ""), int(row.get(hcol) or "")
    except ValueError:
        raise DataError(f"{where}: {wcol},{hcol} must be integers, got "
                        f"{row.get(wcol)!r},{row.get(hcol)!r}") from None
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: {wcol},{hcol} must be positive, got {w},{h}")
    return w, h


def read_manifest(path: Path, bad: BadSamples) -> dict[str, ManifestRow]:
    """{image file name: ManifestRow}; see the module docstring for the columns."""
    out: dict[str, ManifestRow] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "image" not in [f.strip() for f in reader.fieldnames]:
            raise DataError(f"{path} line 1: manifest header must include 'image', "
                            f"found {reader.fieldnames}")
        for raw in reader:
            line = reader.line_num
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            where, image = f"{path} line {line}", row["image"]
            try:
                if not image:
                    raise DataError(f"{where}: empty image name")
                if image in out:
                    raise DataError(f"{where}: duplicate manifest row for {image} "
                                    f"(first at line {out[image].line})")
                entry = ManifestRow(line=line, orig_size=_size(row, "orig_w", "orig_h", where),
                                    stored_size=_size(row, "new_w", "new_h", where),
                                    split=row.get("split", ""))
                if "spacing_mm_x" in row or "spacing_mm_y" in row:
                    sx = _optional_float(row.get("spacing_mm_x", ""), where, "spacing_mm_x")
                    sy = _optional_float(row.get("spacing_mm_y", ""), where, "spacing_mm_y")
                    if (sx is None) != (sy is None):
                        raise DataError(f"{where}: spacing_mm_x and spacing_mm_y must both be "
                                        f"given or both unknown")
                    entry.has_spacing, entry.spacing_mm = True, (sx, sy) if sx else None
                else:
                    for name in ("spacing_mm", "orig_spacing_mm"):
                        if name in row:
                            s = _optional_float(row[name], where, name)
                            entry.has_spacing, entry.spacing_mm = True, (s, s) if s else None
                            break
            except DataError as err:
                bad.report(image or f"{path}:{line}", str(err))
                continue
            out[image] = entry
    return out


def _unit_of(records: list[Record], where: str) -> str:
    """mm when every image has a spacing, px when none has; a mixture cannot be reported."""
    known = [r.spacing_mm is not None for r in records]
    if all(known):
        return "mm"
    if not any(known):
        return "px"
    first = records[known.index(False)].id
    raise DataError(f"{where}: spacing is known for some images but not for {first}; "
                    f"errors cannot be reported in one unit")


def read_landmark_folder(root: str | Path, landmarks_file: str = "landmarks.csv", *,
                         name: Optional[str] = None, num_landmarks: Optional[int] = None,
                         on_bad: str = "error", images_dir: str = "images",
                         manifest_file: str = "manifest.csv",
                         default_spacing_mm: Optional[tuple[float, float]] = None,
                         landmark_names: Optional[list[str]] = None,
                         flip_permutation: Optional[list[int]] = None,
                         sdr_thresholds_mm: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
                         unit: Optional[str] = None,
                         reference_size: Optional[tuple[int, int]] = None) -> LandmarkDataset:
    """Read the generic layout (module docstring) into a LandmarkDataset of original-pixel points.

    default_spacing_mm applies where the manifest has no spacing column. unit None = "mm" when
    every image has a spacing, "px" when none has.
    """
    root = Path(root).expanduser()
    name = name or root.name
    if not root.is_dir():
        raise DataError(f"{name}: dataset folder not found: {root}")
    lm_path = root / landmarks_file
    if not lm_path.is_file():
        raise DataError(f"{name}: landmarks file not found: {lm_path}")
    bad = BadSamples(on_bad, name)
    stored, lines, k = read_points_csv(lm_path, bad, num_landmarks)

    orig_path = root / "orig_coords" / f"{Path(landmarks_file).stem}_orig.csv"
    orig = read_points_csv(orig_path, bad, k)[0] if orig_path.is_file() else None
    manifest_path = root / manifest_file
    manifest = read_manifest(manifest_path, bad) if manifest_path.is_file() else None

    records: list[Record] = []
    ids: dict[str, str] = {}
    for image, points in stored.items():
        if image in bad:
            continue
        where = f"{lm_path} line {lines[image]}"
        row = manifest.get(image) if manifest is not None else None
        try:
            path = inside_folder(root / images_dir, image, where)
            if path.suffix.lower() not in IMAGE_SUFFIXES and path.suffix != "":
                raise DataError(f"{where}: {image} is not an image file ({IMAGE_SUFFIXES})")
            if not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            if manifest is not None and row is None:
                raise DataError(f"{where}: image {image} has no row in {manifest_path}")
            stem = Path(image).stem
            if stem in ids:
                raise DataError(f"{where}: image id {stem} used twice ({ids[stem]}, {image})")
            orig_size = row.orig_size if row else None
            if orig_size is not None:
                size = row.stored_size if row.stored_size else None
                # The file's own size is needed to map the points (only without orig_coords).
                if size is None and orig is None:
                    size = image_size(path)
                scale = (size[0] / orig_size[0], size[1] / orig_size[1]) if size else None
            else:
                scale = (1.0, 1.0)
            if orig is not None:
                if image not in orig:
                    raise DataError(f"{where}: image {image} is absent from {orig_path}")
                exact = orig[image]
                if not np.array_equal(np.isnan(exact), np.isnan(points)):
                    raise DataError(f"{where}: missing landmarks of {image} differ between "
                                    f"{lm_path.name} and {orig_path}")
                if scale is not None:
                    gap = np.nanmax(np.abs(original_to_stored(exact, scale) - points), initial=0)
                    if gap > ORIG_COORDS_TOLERANCE_PX:
                        raise DataError(f"{where}: {orig_path} disagrees with {lm_path.name} for "
                                        f"{image} by {gap:.2f} resized px")
                points = exact
            elif orig_size is not None:
                points = stored_to_original(points, scale)
        except DataError as err:
            bad.report(image, str(err))
            continue
        ids[stem] = image
        if row and row.has_spacing:
            spacing = row.spacing_mm
        elif is_dicom(path):
            # DICOM carries its own spacing (PixelSpacing, else ImagerPixelSpacing): use it
            # unless the manifest says otherwise.
            spacing = read_dicom_spacing(path)[0] or default_spacing_mm
        else:
            spacing = default_spacing_mm
        records.append(Record(id=stem, image_path=path, landmarks=points, spacing_mm=spacing,
                              original_size=orig_size, split=row.split if row else "",
                              meta={"file": image, "source": where}))

    # Manifest rows without landmark rows: unlabelled images, not records; their files must exist.
    unlabeled = []
    for image, row in (manifest or {}).items():
        if image in stored or image in bad:
            continue
        try:
            path = inside_folder(root / images_dir, image, f"{manifest_path} line {row.line}")
        except DataError as err:
            bad.report(image, str(err))
            continue
        if not path.is_file():
            bad.report(image, f"{manifest_path} line {row.line}: image file not found: {path}")
            continue
        unlabeled.append(image)
    if unlabeled:
        log.info("%s: %d manifest image(s) have no landmarks and are not records",
                 name, len(unlabeled))

    if unit is None:
        unit = _unit_of(records, name) if records else "px"
    dataset = LandmarkDataset(name, records, k, landmark_names, flip_permutation,
                              sdr_thresholds_mm, unit, reference_size)
    dataset.unlabeled = unlabeled
    return bad.attach(dataset)
