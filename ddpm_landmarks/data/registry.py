"""Dataset names -> builders from a DataConfig.

    dataset = build_dataset(cfg.data)          # e.g. cfg.data.dataset = "isbi2015"

Where the data lives: DataConfig.root when set (~ and $VARS expanded), else
$DDPM_LANDMARKS_DATA/<default folder> with DDPM_LANDMARKS_DATA defaulting to `data` (relative
to the working directory). The default folders are the names of ../shared/data. ISBI, hand
and chest also get the named splits of data/named_splits.py (ISBI "test" = Test1 + Test2, the
released code's released_train / released_val / released_test).

With data.on_bad_sample=skip, build_dataset also leaves out every image that fails the checks
of data/record_checks.py (it does not decode, a landmark lies outside it, its spacing is
implausible): it decodes every image once, so that a bad file is counted when the dataset is
read and never met mid-training. With `error` (the default) those checks are the run's
start-up check (data/checks.py), and reading does not decode.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.data.named_splits import add_isbi_splits, add_released_splits
from ddpm_landmarks.data.record_checks import without_unusable_records
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.errors import DataError
from ddpm_landmarks.utils.paths import DATA_ENV, data_dir, expand_path

log = logging.getLogger(__name__)

DEFAULT_SUBDIRS = {
    "isbi2015": "isbi2015",
    "hand_dha": "hand_dha",
    "chest_gu2net": "chest_shenzhen_labels/chest",
    "aasce_spine": "aasce2019_spine",
}


def resolve_root(cfg: DataConfig, default_subdir: str) -> Path:
    """The dataset folder; DataError naming it and how to point elsewhere when it is absent."""
    if cfg.root:
        root = expand_path(cfg.root)
        how = "data.root"
    else:
        base = data_dir()
        root = base / default_subdir
        how = f"data.root, or {DATA_ENV} (now {str(base)!r}) to the folder holding {default_subdir}/"
    if not root.is_dir():
        raise DataError(f"{cfg.dataset}: data folder not found: {root.resolve()}; set {how}")
    return root


def _isbi(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.isbi import read_isbi2015
    root = resolve_root(cfg, DEFAULT_SUBDIRS["isbi2015"])
    return add_isbi_splits(read_isbi2015(root, cfg.ground_truth, cfg.on_bad_sample), str(root))


def _hand(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.hand import read_hand_dha
    # The cross-validation set is the one the configured splits name (cv2_train -> set 2).
    sets = {m.group(1) for s in (cfg.train_split, cfg.eval_split)
            if (m := re.fullmatch(r"cv(\d+)_(train|test)", s))}
    if len(sets) > 1:
        raise DataError(f"hand_dha: train_split {cfg.train_split!r} and eval_split "
                        f"{cfg.eval_split!r} come from different cross-validation sets")
    cv_set = int(sets.pop()) if sets else 1
    return add_released_splits(read_hand_dha(resolve_root(cfg, DEFAULT_SUBDIRS["hand_dha"]),
                                             wrist_landmarks=cfg.wrist_landmarks,
                                             cv_set=cv_set, on_bad=cfg.on_bad_sample))


def _chest(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.chest import read_chest_gu2net
    return add_released_splits(read_chest_gu2net(
        resolve_root(cfg, DEFAULT_SUBDIRS["chest_gu2net"]), reference_size=cfg.reference_size,
        on_bad=cfg.on_bad_sample))


def _spine(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.spine import read_aasce_spine
    return read_aasce_spine(resolve_root(cfg, DEFAULT_SUBDIRS["aasce_spine"]),
                            cfg.on_bad_sample)


def _generic(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.generic import read_landmark_folder
    if not cfg.root:
        raise DataError("generic: set data.root to the folder holding images/ and landmarks.csv")
    root = resolve_root(cfg, "")
    return read_landmark_folder(root, "landmarks.csv", name=root.name,
                                num_landmarks=cfg.num_landmarks, on_bad=cfg.on_bad_sample)


def _synthetic(cfg: DataConfig) -> LandmarkDataset:
    from ddpm_landmarks.data.synthetic import build_synthetic_dataset
    return build_synthetic_dataset(cfg)


DATASETS: dict[str, Callable[[DataConfig], LandmarkDataset]] = {
    "isbi2015": _isbi,
    "hand_dha": _hand,
    "chest_gu2net": _chest,
    "aasce_spine": _spine,
    "generic": _generic,
    "synthetic": _synthetic,
}


def build_dataset(cfg: DataConfig) -> LandmarkDataset:
    """The labelled dataset cfg.dataset names, checked against cfg.num_landmarks when set."""
    builder = DATASETS.get(cfg.dataset)
    if builder is None:
        raise DataError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(DATASETS)}")
    dataset = builder(cfg)
    if cfg.num_landmarks is not None and cfg.num_landmarks != dataset.num_landmarks:
        raise DataError(f"{cfg.dataset}: data.num_landmarks is {cfg.num_landmarks} but the "
                        f"dataset has {dataset.num_landmarks} landmarks")
    if cfg.on_bad_sample == "skip":
        before = len(dataset.skipped)
        dataset = without_unusable_records(dataset)
        if len(dataset.skipped) > before:
            log.warning("%s: skipped %d image(s) that fail the start-up checks "
                        "(on_bad_sample=skip); first: %s", dataset.name,
                        len(dataset.skipped) - before, dataset.skipped[before])
    return dataset
