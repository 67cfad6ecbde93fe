"""Chest x-rays with 6 landmarks in the GU2Net label format (Zhu et al., MICCAI 2021), the
Shenzhen images of ../shared/data/chest_shenzhen_labels:

    root/labels/<id>.txt     first line: the number of points (6); then one `u v` per line,
                             normalised to [0, 1]
    root/pngs/<id>.png       (GU2Net's folder name; `images/` works too) any of IMAGE_SUFFIXES

u and v are fractions of the image EXTENT (0 = left/top edge, 1 = right/bottom edge), so the
pixel-centre coordinate is x = u * W - 0.5, y = v * H - 0.5 with (W, H) the image file's size,
which is therefore read (from the file header) at build time. The file is the original grid.

There is no pixel spacing: errors are reported in pixels of a reference grid,
dataset.unit = "px@WxH" with reference_size (DataConfig.reference_size, 512 x 512 as in the
GU2Net-family papers). SDR thresholds 3, 6, 9 px of that grid: the chest columns of the
GU2Net-family result tables (GU2Net's evaluation.py computes 2, 2.5, 3, 4, 6, 9, 10).

Splits follow GU2Net's code: the sorted ids, first 195 `train`, next 34 `val`, the rest `test`
(50 of the 279 labels). The rank is taken over the LABEL files, so a missing image does not
shift the others into another split.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.data.generic import BadSamples, parse_float
from ddpm_landmarks.data.image_io import IMAGE_SUFFIXES, image_size
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.errors import DataError

log = logging.getLogger(__name__)

NUM_LANDMARKS = 6
SDR_THRESHOLDS_PX = (3.0, 6.0, 9.0)
SPLIT_COUNTS = (("train", 195), ("val", 34))      # the rest is "test"
IMAGE_FOLDERS = ("pngs", "images")


def read_label(path: Path, num_landmarks: int = NUM_LANDMARKS) -> np.ndarray:
    """(K, 2) normalised (u, v) from a GU2Net label file; DataError naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read label file: {err}") from None
    while lines and not lines[-1].strip():
        lines.pop()                                 # trailing blank lines are harmless
    if not lines:
        raise DataError(f"{path} line 1: empty label file")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{path} line 1: expected the number of points, found "
                        f"{lines[0]!r}") from None
    body = lines[1:]
    if count != len(body):
        line = 1 + min(count, len(body)) + 1        # first missing or first extra line
        raise DataError(f"{path} line {line}: line 1 announces {count} points but "
                        f"{len(body)} follow")
    if count != num_landmarks:
        raise DataError(f"{path} line 1: {count} points, expected {num_landmarks}")
    points = np.empty((count, 2), dtype=np.float64)
    for i, text in enumerate(body):
        where = f"{path} line {i + 2}"
        fields = text.split()
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'u v', found {text!r}")
        points[i] = [parse_float(f, where) for f in fields]
        if not ((0 <= points[i]) & (points[i] <= 1)).all():
            raise DataError(f"{where}: normalised coordinate outside [0, 1]: {text!r}")
    return points


def normalized_to_pixels(uv: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Fractions of the image extent -> pixel-centre coordinates on a (W, H) grid."""
    return np.asarray(uv, dtype=np.float64) * np.asarray(size, dtype=np.float64) - 0.5


def file_image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the PNG/BMP header (full-size chest films are slow to decode), else decode."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
    elif head[:2] == b"BM" and len(head) >= 26:
        w, h = struct.unpack("<ii", head[18:26])
        h = abs(h)                                  # negative height = top-down BMP
    else:
        return image_size(path)
    if w <= 0 or h <= 0:
        raise DataError(f"cannot read image (corrupt header): {path}")
    return int(w), int(h)


def assign_split(rank: int) -> str:
    for name, count in SPLIT_COUNTS:
        if rank < count:
            return name
        rank -= count
    return "test"


def _image_folder(root: Path, images_dir: Optional[str]) -> Optional[Path]:
    if images_dir is not None:
        return root / images_dir
    return next((root / d for d in IMAGE_FOLDERS if (root / d).is_dir()), None)


def read_chest_gu2net(root: str | Path, *, reference_size: Sequence[int] = (512, 512),
                      on_bad: str = "error", labels_dir: str = "labels",
                      images_dir: Optional[str] = None,
                      num_landmarks: int = NUM_LANDMARKS) -> LandmarkDataset:
    root = Path(root).expanduser()
    label_root = root / labels_dir
    if not label_root.is_dir():
        raise DataError(f"chest_gu2net: label folder not found: {label_root}")
    labels = sorted(label_root.glob("*.txt"))
    if not labels:
        raise DataError(f"chest_gu2net: no .txt label files in {label_root}")
    image_root = _image_folder(root, images_dir)
    files: dict[str, Path] = {}
    if image_root is not None and image_root.is_dir():
        for p in sorted(image_root.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                if p.stem in files:
                    raise DataError(f"chest_gu2net: two images for id {p.stem}: "
                                    f"{files[p.stem]}, {p}")
                files[p.stem] = p
    where_images = image_root or f"{root}/({'|'.join(IMAGE_FOLDERS)})"

    bad = BadSamples(on_bad, "chest_gu2net", log)
    records = []
    for rank, label in enumerate(labels):
        try:
            uv = read_label(label, num_landmarks)
            path = files.get(label.stem)
            if path is None:
                raise DataError(f"{label}: no image {label.stem}.<png|jpg|...> in {where_images}")
            size = file_image_size(path)
        except DataError as err:
            bad.report(label.stem, str(err))
            continue
        records.append(Record(id=label.stem, image_path=path,
                              landmarks=normalized_to_pixels(uv, size), spacing_mm=None,
                              original_size=None, split=assign_split(rank),
                              meta={"label": str(label)}))
    w, h = (int(v) for v in reference_size)
    dataset = LandmarkDataset("chest_gu2net", records, num_landmarks, None, None,
                              SDR_THRESHOLDS_PX, f"px@{w}x{h}", (w, h))
    return bad.attach(dataset)
