"""The one sample type every reader produces, and the dataset container around it.

Coordinate conventions (used everywhere in this package):
- points are (x, y) = (column, row), float, pixel-centre convention: integer coordinates are
  pixel centres, the image spans [-0.5, W-0.5] x [-0.5, H-0.5]; this is what cv2.resize and
  cv2.warpAffine use.
- `landmarks` are in ORIGINAL pixels: the acquisition grid the spacing refers to. The image
  array may be stored at a different resolution (e.g. the downscaled PNGs in ../shared/data);
  `original_size` says what the original grid was, and `stored_to_original` maps between them.
- spacing is (x, y) in mm per original pixel, never (row, col): DICOM stores (row, col) and
  swapping them is a known bug of published code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ddpm_landmarks.errors import DataError


@dataclass
class LandmarkSample:
    id: str
    image: np.ndarray                   # float32 (H, W) in [0, 1], as stored on disk
    landmarks: np.ndarray               # float64 (K, 2) x, y in original pixels; NaN = missing
    spacing_mm: Optional[tuple[float, float]]  # (x, y) mm per original pixel; None = unknown
    original_size: tuple[int, int]      # (width, height) of the original acquisition grid
    meta: dict = field(default_factory=dict)

    @property
    def num_landmarks(self) -> int:
        return int(self.landmarks.shape[0])

    @property
    def stored_scale(self) -> tuple[float, float]:
        """(sx, sy) = stored size / original size; (1, 1) when the file is the original."""
        h, w = self.image.shape[:2]
        return w / self.original_size[0], h / self.original_size[1]

    def landmarks_on_stored_grid(self) -> np.ndarray:
        return original_to_stored(self.landmarks, self.stored_scale)


def original_to_stored(points: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Pixel-centre resize mapping: x_s = (x_o + 0.5) * s - 0.5 (as cv2.resize samples)."""
    s = np.asarray(scale, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) * s - 0.5


def stored_to_original(points: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Inverse of original_to_stored: x_o = (x_s + 0.5) / s - 0.5."""
    s = np.asarray(scale, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) / s - 0.5


@dataclass
class Record:
    """Everything about one labelled image except its pixels (those are read lazily)."""
    id: str
    image_path: Path
    landmarks: np.ndarray               # (K, 2) original pixels, NaN = missing
    spacing_mm: Optional[tuple[float, float]] = None
    original_size: Optional[tuple[int, int]] = None  # None = the stored image is the original
    split: str = ""
    meta: dict = field(default_factory=dict)


def check_landmarks(points: np.ndarray, num_landmarks: int, where: str) -> np.ndarray:
    """(K, 2) float64 with K as expected; +/-inf is refused (NaN means missing and is fine)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise DataError(f"{where}: landmarks must be a K x 2 array, got shape {points.shape}")
    if points.shape[0] != num_landmarks:
        raise DataError(f"{where}: expected {num_landmarks} landmarks, found {points.shape[0]}")
    if np.isinf(points).any():
        raise DataError(f"{where}: infinite landmark coordinate")
    # A point with one coordinate missing is missing altogether.
    points[np.isnan(points).any(axis=1)] = np.nan
    return points


class LandmarkDataset:
    """An ordered list of records plus what the dataset knows about its landmarks.

    Indexing loads the image and returns a LandmarkSample. `split(name)` gives a sub-dataset.
    """

    def __init__(self, name: str, records: list[Record], num_landmarks: int,
                 landmark_names: Optional[list[str]] = None,
                 flip_permutation: Optional[list[int]] = None,
                 sdr_thresholds_mm: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
                 unit: str = "mm",
                 reference_size: Optional[tuple[int, int]] = None,
                 image_loader: Optional[Callable[[Path], np.ndarray]] = None):
        self.name = name
        self.records = list(records)
        self.num_landmarks = num_landmarks
        self.landmark_names = landmark_names or [str(i) for i in range(num_landmarks)]
        if flip_permutation is not None:
            perm = list(flip_permutation)
            if sorted(perm) != list(range(num_landmarks)):
                raise DataError(f"{name}: flip permutation {perm} is not a permutation of "
                                f"0..{num_landmarks - 1}")
            flip_permutation = perm
        self.flip_permutation = flip_permutation
        self.sdr_thresholds_mm = list(sdr_thresholds_mm)
        # unit of reported errors: "mm" (spacing per image), "px" (original pixels) or
        # "px@WxH" (pixels of a reference grid `reference_size`, e.g. chest at 512 x 512).
        if unit not in ("mm", "px") and reference_size is None:
            raise DataError(f"{name}: unit {unit!r} needs a reference_size")
        self.unit = unit
        self.reference_size = reference_size
        if image_loader is None:
            from ddpm_landmarks.data.image_io import read_image
            image_loader = read_image
        self._load = image_loader
        # Filled by readers: problems skipped under on_bad="skip", images present without any
        # landmarks (usable for pretraining), annotated ids whose image is absent.
        self.skipped: list[str] = []
        self.skipped_names: dict[str, str] = {}  # id / file name of a skipped image -> why
        self.unlabeled: list = []
        self.absent_ids: list[str] = []
        # Named splits beside each record's own `split`, set by readers (data/named_splits.py):
        # name -> ids in order (e.g. ISBI "test" = test1 + test2, the released code's
        # "released_train"), or -> a message saying why this copy of the data cannot give it.
        self.derived_splits: dict[str, list[str] | str] = {}
        for r in self.records:
            check_landmarks(r.landmarks, num_landmarks, f"{name}/{r.id}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> LandmarkSample:
        r = self.records[index]
        image = self._load(r.image_path)
        original_size = r.original_size or (image.shape[1], image.shape[0])
        return LandmarkSample(id=r.id, image=image, landmarks=r.landmarks.copy(),
                              spacing_mm=r.spacing_mm, original_size=original_size,
                              meta={"split": r.split, "path": str(r.image_path), **r.meta})

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def splits(self) -> list[str]:
        """Every split this dataset can give: the records' own and the derived ones."""
        own = {r.split for r in self.records}
        return sorted(own | {k for k, v in self.derived_splits.items() if not isinstance(v, str)})

    def subset(self, ids: Sequence[str], name: Optional[str] = None) -> "LandmarkDataset":
        """Sub-dataset with the given ids, in the given order; unknown ids are errors."""
        by_id = {r.id: r for r in self.records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{self.name}: unknown image ids {missing[:5]}")
        return self._like([by_id[i] for i in ids], name or self.name)

    def split(self, split: str) -> "LandmarkDataset":
        derived = self.derived_splits.get(split)
        if isinstance(derived, str):
            raise DataError(f"{self.name}: split '{split}': {derived}")
        if derived is not None:
            return self.subset(derived, f"{self.name}:{split}")
        chosen = [r for r in self.records if r.split == split]
        if not chosen:
            raise DataError(f"{self.name}: no images in split '{split}'; splits: {self.splits}")
        return self._like(chosen, f"{self.name}:{split}")

    def _like(self, records: list[Record], name: str) -> "LandmarkDataset":
        return LandmarkDataset(name, records, self.num_landmarks, self.landmark_names,
                               self.flip_permutation, self.sdr_thresholds_mm, self.unit,
                               self.reference_size, self._load)
