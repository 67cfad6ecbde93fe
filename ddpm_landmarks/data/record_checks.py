"""Checks of one image file and one labelled record, made before any training step (the run
as a whole: data/checks.py). Each returns a problem message naming the file, or None.

- The image decodes: the whole file goes through read_image, as training will read it, and a
  PNG / JPEG must end with its end marker (IEND chunk / EOI): OpenCV decodes a truncated JPEG
  into an image with a grey bottom and only prints a warning. An empty file is named as such.
- Landmarks lie within the image, with a margin: on the original grid of W x H pixels
  (pixel-centre convention: the image spans [-0.5, W - 0.5]) a point may lie up to
  LANDMARK_MARGIN x W (x) or x H (y) beyond the edge. Annotators do click slightly outside the
  field of view (the AASCE spine set has one point 2.5 % of the width out); points in another
  unit or grid (x and y swapped, original pixels on a resized file, mm) land far outside.
  ISBI 2015, the AASCE spine set and the hand atlas pass (tests/data/test_checks.py).
- Spacing is plausible: finite and within SPACING_RANGE_MM mm per original pixel. X-ray
  detectors have 0.05-0.2 mm pixels and downsampled copies a few tenths of a mm; outside the
  range the value is in another unit (um, m, or pixels per mm instead of mm per pixel).
- An image name read from a file (a CSV) resolves inside its folder: `inside_folder` refuses
  absolute paths, `..` components and symlinks that lead out of the (resolved) folder.

Decoding is cached per process by (resolved path, size, modification time), so that a run's
start-up check and a reader in skip mode decode each file once; `check_images` decodes on
threads (OpenCV releases the GIL while it decodes).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Iterable, Optional, Sequence

import numpy as np

from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.errors import DataError

LANDMARK_MARGIN = 0.05                  # fraction of the image side a point may lie outside
SPACING_RANGE_MM = (0.01, 5.0)          # plausible mm per original x-ray pixel
_TAIL_BYTES = 1024                      # where the end marker of a PNG / JPEG must be


@dataclass(frozen=True)
class ImageCheck:
    size: Optional[tuple[int, int]]     # (width, height) of the stored file when it decodes
    problem: Optional[str] = None


_decoded: dict[tuple[str, int, int], ImageCheck] = {}


def _truncation(path: Path, size: int) -> Optional[str]:
    """Why a PNG / JPEG looks cut short (no end marker near its end), else None."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    if head.startswith(b"\x89PNG") and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk at its end)"
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_image_file(path: str | Path) -> ImageCheck:
    """Whether `path` decodes completely (module doc); cached per process."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return ImageCheck(None, f"image not found: {path}")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _decoded:
        return _decoded[key]
    if stat.st_size == 0:
        result = ImageCheck(None, f"{path}: empty file (0 bytes)")
    elif (cut := _truncation(path, stat.st_size)) is not None:
        result = ImageCheck(None, f"{path}: {cut}")
    else:
        try:
            image = read_image(path)
            result = ImageCheck((int(image.shape[1]), int(image.shape[0])))
        except DataError as err:
            result = ImageCheck(None, str(err))
    _decoded[key] = result
    return result


MAX_THREADS = 16                        # every process of a launch decodes: do not oversubscribe


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:              # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def check_images(paths: Iterable[str | Path], threads: Optional[int] = None
                 ) -> dict[Path, ImageCheck]:
    """{path: ImageCheck} for every distinct path, decoded on `threads` threads."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    threads = threads or default_threads()
    if threads == 1 or len(unique) < 2:
        return {p: check_image_file(p) for p in unique}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(unique, pool.map(check_image_file, unique)))


def landmark_problem(points: np.ndarray, size: Sequence[int], where: str) -> Optional[str]:
    """Why some landmark lies outside the W x H grid by more than LANDMARK_MARGIN, else None."""
    w, h = size
    points = np.asarray(points, dtype=np.float64)
    if np.isinf(points).any():
        return f"{where}: infinite landmark coordinate"
    lows = np.array([-0.5 - LANDMARK_MARGIN * w, -0.5 - LANDMARK_MARGIN * h])
    highs = np.array([w - 0.5 + LANDMARK_MARGIN * w, h - 0.5 + LANDMARK_MARGIN * h])
    outside = ((points < lows) | (points > highs)).any(axis=1)      # NaN (missing) is False
    if not outside.any():
        return None
    k = int(np.flatnonzero(outside)[0])
    x, y = points[k]
    return (f"{where}: landmark {k} at ({x:.6g}, {y:.6g}) lies outside the {w}x{h} image "
            f"(original pixels) by more than {LANDMARK_MARGIN:.0%} of its size"
            f"{f' ({int(outside.sum())} such landmarks)' if outside.sum() > 1 else ''}; "
            f"check the unit and the x, y order of the coordinates")


def spacing_problem(spacing: Optional[Sequence[float]], where: str) -> Optional[str]:
    """Why a (x, y) mm-per-pixel spacing is implausible, else None (None = unknown: fine)."""
    if spacing is None:
        return None
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(v) and low <= v <= high for v in spacing):
        return (f"{where}: pixel spacing {tuple(spacing)} mm is not within the plausible "
                f"{low}-{high} mm per pixel of x-ray images (another unit? mm per ORIGINAL "
                f"pixel expected)")
    return None


def record_where(dataset_name: str, record: Record) -> str:
    """How messages name a record: the landmark file and line when the reader kept them."""
    source = record.meta.get("source")
    return f"{source} ({record.image_path.name})" if source else \
        f"{dataset_name}/{record.id} ({record.image_path})"


def record_problems(dataset_name: str, records: Sequence[Record],
                    threads: Optional[int] = None) -> dict[str, str]:
    """{record id: first problem} over decoding, landmarks and spacing (module doc)."""
    decoded = check_images((r.image_path for r in records), threads)
    problems = {}
    for r in records:
        found = decoded[Path(r.image_path)]
        where = record_where(dataset_name, r)
        problem = found.problem
        if problem is None:
            problem = landmark_problem(r.landmarks, r.original_size or found.size, where) \
                or spacing_problem(r.spacing_mm, where)
        if problem is not None:
            problems[r.id] = problem
    return problems


def without_unusable_records(dataset: LandmarkDataset,
                             threads: Optional[int] = None) -> LandmarkDataset:
    """The dataset minus records that fail a check (data.on_bad_sample=skip): their messages
    are added to dataset.skipped, and dataset.skipped_names maps their ids and file names to
    them."""
    problems = record_problems(dataset.name, dataset.records, threads)
    if not problems:
        return dataset
    kept = [r for r in dataset.records if r.id not in problems]
    out = LandmarkDataset(dataset.name, kept, dataset.num_landmarks, dataset.landmark_names,
                          dataset.flip_permutation, dataset.sdr_thresholds_mm, dataset.unit,
                          dataset.reference_size, dataset._load)
    out.unlabeled, out.absent_ids = dataset.unlabeled, dataset.absent_ids
    out.skipped = list(dataset.skipped) + list(problems.values())
    out.skipped_names = dict(dataset.skipped_names)
    for r in dataset.records:
        if r.id in problems:
            out.skipped_names.update({r.id: problems[r.id], r.image_path.name: problems[r.id]})
    return out


def inside_folder(folder: Path, name: str, where: str) -> Path:
    """folder / name, refusing names that leave `folder` (module doc); DataError at `where`."""
    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute() or \
            name.startswith(("/", "\\")):
        raise DataError(f"{where}: image path {name!r} is absolute; image paths are relative "
                        f"to {folder}")
    if ".." in name.replace("\\", "/").split("/"):
        raise DataError(f"{where}: image path {name!r} leaves the dataset folder {folder} "
                        f"('..')")
    path = folder / name
    base = folder.resolve()
    if not path.resolve().is_relative_to(base):
        raise DataError(f"{where}: image path {name!r} is a link to {path.resolve()}, outside "
                        f"the dataset folder {base}; copy the file in, or link the whole "
                        f"folder")
    return path
