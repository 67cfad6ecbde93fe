"""Image-level class labels: the CSV label file, its images, splits and classes.

    task = load_label_task(cfg.labels, cfg.data)      # ClassificationTask
    task.classes                                       # sorted distinct labels
    train = task.split("train"); data = ClassificationImages(train, task, cfg.data, cfg.augment,
                                                             train=True, seed=0)
    item = data[0]                                     # {"image" (1, S, S) in [-1, 1], "label", "index"}

Label file (`labels.file`): CSV with a header; columns `image` and `label` (names configurable),
optionally `split`:

    image,label,split
    0001.png,severe,train
    0002,mild,test

`image` is a file name, a path relative to the image folder, or an image id (the file name
without its suffix, as the dataset readers name images). `label` is a class name or an integer.
Where the images are:
  - `labels.images` = a folder (searched recursively): any images, no landmarks needed; the CSV
    must then have a split column;
  - `labels.images` empty: the images of the registry dataset `data.dataset` (data/registry.py:
    isbi2015, aasce_spine, generic, ...), matched by id or file name; the split is the CSV's
    split column when it has one, else the dataset's own (the generic layout's manifest split).
Classes are the sorted distinct labels of the rows (numerically when every label is an
integer, so 2 < 10). Every problem is a DataError naming the file and line: a missing column,
an empty or duplicated image, an image not found, a split outside the valid names, a class
without any training image.

Images go through the landmark pipeline with zero landmarks (HeatmapDataset, LandmarkTransform):
the same resize (stretch / letterbox), augmentation, DICOM reading and per-item randomness as
fine-tuning; a horizontal flip is allowed (there are no landmark labels to swap), so switch it
off (augment.flip_prob=0) when a label has a side.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ddpm_landmarks.config.classify import LabelsConfig
from ddpm_landmarks.config.common import AugmentConfig, DataConfig, HeatmapConfig
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.randomness import ItemRandomness
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.data.unlabeled import find_images, image_id
from ddpm_landmarks.errors import DataError
from ddpm_landmarks.utils.paths import expand_path

NO_LANDMARKS = np.zeros((0, 2), dtype=np.float64)


@dataclass
class LabelRow:
    image: str                          # as written in the file
    label: str
    split: Optional[str]                # None when the file has no split column
    line: int


@dataclass
class LabelledImage:
    id: str                             # unique: the dataset's id, or the folder-relative stem
    name: str                           # the image as written in the label file
    path: Path
    label: str
    split: str
    line: int                           # line of the label file
    original_size: Optional[tuple[int, int]] = None


def read_label_csv(path: str | Path, cfg: LabelsConfig) -> list[LabelRow]:
    """Rows of a label file; DataError naming the file and line for every problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path} (labels.file)")
    rows: list[LabelRow] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        for what, name in (("image", cfg.image_column), ("label", cfg.label_column)):
            if name not in header:
                raise DataError(f"{path} line 1: no {what} column {name!r} in the header "
                                f"{header} (expected image,label[,split]; labels.{what}_column "
                                f"names it)")
        col_image, col_label = header.index(cfg.image_column), header.index(cfg.label_column)
        col_split = header.index(cfg.split_column) if cfg.split_column in header else None
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            where = f"{path} line {line}"
            if len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields, found {len(row)}")
            image, label = row[col_image].strip(), row[col_label].strip()
            if not image:
                raise DataError(f"{where}: empty image")
            if not label:
                raise DataError(f"{where}: empty label for image {image!r}")
            split = None
            if col_split is not None:
                split = row[col_split].strip()
                if not split:
                    raise DataError(f"{where}: empty split for image {image!r}")
            rows.append(LabelRow(image, label, split, line))
    if not rows:
        raise DataError(f"{path}: no labelled image")
    return rows


def sorted_classes(labels: Sequence[str]) -> list[str]:
    """Distinct labels, sorted numerically when all are integers, else as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


class _Index:
    """Name -> image lookup by relative path, file name or id; ambiguous names are errors."""

    def __init__(self, where: str):
        self.where = where
        self.by_key: dict[str, Optional[object]] = {}

    def add(self, keys: Sequence[str], item: object) -> None:
        for key in dict.fromkeys(keys):
            # Two images answering to one name (a.png and a.jpg both "a") make it ambiguous.
            self.by_key[key] = None if key in self.by_key and self.by_key[key] is not item \
                else item

    def find(self, name: str, file: Path, line: int) -> object:
        key = name.replace("\\", "/")
        if key not in self.by_key:
            raise DataError(f"{file} line {line}: image {name!r} not found in {self.where} "
                            f"(neither a file name, a relative path nor an image id there)")
        item = self.by_key[key]
        if item is None:
            raise DataError(f"{file} line {line}: image {name!r} is ambiguous in {self.where} "
                            f"(several files have that name or id; give the file name)")
        return item


@dataclass
class ClassificationTask:
    """The labelled images of a run, their classes, and where they came from."""
    images: list[LabelledImage]
    classes: list[str]
    source: Path                        # the label file
    name: str                           # for logs: the label file's stem and the dataset

    @property
    def splits(self) -> list[str]:
        return sorted({i.split for i in self.images})

    def label_index(self, image: LabelledImage) -> int:
        return self.classes.index(image.label)

    def split(self, split: str) -> list[LabelledImage]:
        chosen = [i for i in self.images if i.split == split]
        if not chosen:
            raise DataError(f"{self.source}: no labelled image in split {split!r}; splits with "
                            f"labelled images: {', '.join(self.splits)}")
        return chosen

    def subset(self, images: Sequence[LabelledImage], ids: Sequence[str]) -> list[LabelledImage]:
        by_id = {i.id: i for i in images}
        return [by_id[i] for i in ids]

    def check_training_classes(self, train: Sequence[LabelledImage], what: str) -> None:
        """Every class needs a training image: the model could never learn to predict it."""
        present = {i.label for i in train}
        for cls in self.classes:
            if cls not in present:
                line = min(i.line for i in self.images if i.label == cls)
                raise DataError(f"{self.source} line {line}: class {cls!r} has no training "
                                f"image ({what})")


def _folder_images(rows: list[LabelRow], folder: Path, file: Path) -> list[LabelledImage]:
    index = _Index(f"image folder {folder}")
    for path in find_images(folder):
        rel = path.relative_to(folder)
        index.add([rel.as_posix(), path.name, image_id(path),
                   (rel.parent / image_id(path)).as_posix()], path)
    out = []
    for row in rows:
        if row.split is None:
            raise DataError(f"{file} line 1: no split column: images from a folder "
                            f"(labels.images) need one (train / val / test rows)")
        path = index.find(row.image, file, row.line)
        rel = path.relative_to(folder)
        out.append(LabelledImage((rel.parent / image_id(path)).as_posix(), row.image, path,
                                 row.label, row.split, row.line))
    return out


def _dataset_images(rows: list[LabelRow], dataset: LandmarkDataset,
                    file: Path) -> list[LabelledImage]:
    index = _Index(f"dataset {dataset.name} ({len(dataset)} images)")
    for r in dataset.records:
        index.add([r.id, r.image_path.name], r)
    out = []
    for row in rows:
        r = index.find(row.image, file, row.line)
        out.append(LabelledImage(r.id, row.image, r.image_path, row.label,
                                 row.split if row.split is not None else r.split, row.line,
                                 r.original_size))
    return out


def valid_splits(cfg: LabelsConfig, data: DataConfig, extra: Sequence[str] = ()) -> list[str]:
    names = list(cfg.splits) or [data.train_split, cfg.val_split, data.eval_split]
    return list(dict.fromkeys(s for s in [*names, *extra] if s))


def load_label_task(cfg: LabelsConfig, data: DataConfig,
                    extra_splits: Sequence[str] = ()) -> ClassificationTask:
    """Read the label file and find its images (module doc); `extra_splits` are valid too
    (an evaluation of another split than the run's)."""
    if not cfg.file:
        if data.dataset != "synthetic":
            raise DataError("labels.file is empty: give the label CSV (image,label[,split]); "
                            "only data.dataset=synthetic has a built-in task")
        from ddpm_landmarks.data.synthetic_classes import synthetic_marker_task
        cfg, data = synthetic_marker_task(cfg, data)
    file = expand_path(cfg.file)
    rows = read_label_csv(file, cfg)
    if cfg.images:
        folder = expand_path(cfg.images)
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder} (labels.images)")
        images, name = _folder_images(rows, folder, file), folder.name
    else:
        from ddpm_landmarks.data.registry import build_dataset
        dataset = build_dataset(data)
        images, name = _dataset_images(rows, dataset, file), dataset.name
    first: dict[str, LabelledImage] = {}
    for image in images:            # "a.png" and "a" are one image
        if image.id in first:
            raise DataError(f"{file} line {image.line}: image {image.name!r} is labelled twice "
                            f"(first at line {first[image.id].line} as "
                            f"{first[image.id].name!r})")
        first[image.id] = image
    allowed = valid_splits(cfg, data, extra_splits)
    if rows[0].split is not None:
        for image, row in zip(images, rows):
            if image.split not in allowed:
                raise DataError(f"{file} line {row.line}: split {image.split!r} is not one of "
                                f"{allowed} (data.train_split, labels.val_split, "
                                f"data.eval_split; labels.splits lists other valid names)")
    else:
        # The dataset's own splits (not typed by the user): rows of other splits stay unused.
        images = [i for i in images if i.split in allowed]
    task = ClassificationTask(images, sorted_classes([i.label for i in images]), file,
                              f"{file.stem}@{name}")
    if len(task.classes) < 2:
        raise DataError(f"{file}: {len(task.classes)} class(es) {task.classes}: classification "
                        f"needs at least 2")
    return task


class ClassificationImages(ItemRandomness, torch.utils.data.Dataset):
    """Labelled images -> {"image": (1, S, S) float32 in [-1, 1], "label": class index,
    "index"}; resize and augmentation by the landmark pipeline with zero landmarks, randomness
    per item (data/randomness.py)."""

    def __init__(self, images: Sequence[LabelledImage], task: ClassificationTask,
                 data_cfg: DataConfig, aug_cfg: AugmentConfig, train: bool, seed: int = 0):
        self.images = list(images)
        self.labels = [task.label_index(i) for i in self.images]
        records = [Record(id=i.id, image_path=i.path, landmarks=NO_LANDMARKS,
                          original_size=i.original_size, split=i.split) for i in self.images]
        # flip_permutation [] (no landmarks to swap) lets augment.flip_prob through.
        dataset = LandmarkDataset(task.name, records, num_landmarks=0, flip_permutation=[])
        self.images_on_grid = HeatmapDataset(dataset, data_cfg, aug_cfg, HeatmapConfig(),
                                             train=train)
        self.train, self.seed = train, int(seed)

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.item(int(index), self.item_rng(index) if self.train else None)

    def item(self, index: int, rng) -> dict:
        image = self.images_on_grid.item(index, rng)["image"]
        return {"image": image, "label": torch.tensor(self.labels[index]), "index": int(index)}
