"""Unlabelled image pools for self-supervised pretraining, mixed by weight, minus exclusions.

    pools = build_pools(cfg.unlabeled)           # MixedPools; pools.report says what was removed
    text = image_list_text(pools.paths)          # run_dir/pretrain_images.txt, for audits

Pools are mixed by weight when training draws from them (data/pretrain_data.pool_slots: a pool
is drawn in proportion to its weight whatever its size). Image lists are sorted, so the same
config gives the same pools on every machine.

Exclusions (UnlabeledConfig.exclude) keep evaluation images out of pretraining. Each entry is
- "dataset:split" or "dataset:split@/dataset/root": the images of that split, resolved through
  ddpm_landmarks.data.registry.build_dataset; excluded by resolved absolute path;
- a path to a text file (one entry per line; blank lines and "# ..." are skipped): a line with
  a folder separator is an image path (relative to the list file's folder), excluded by path;
  any other line is an image id (file name minus an image suffix, see image_id);
- anything else: one image id, e.g. "151" or "151.png".
A file written from image_list_text is itself a valid exclusion file. An entry that excludes
nothing is logged as a warning (probably a typo) rather than failing; a missing list file or
dataset is an error, because silently excluding nothing is how test images leak.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import DataConfig, UnlabeledConfig
from ddpm_landmarks.data.image_io import IMAGE_SUFFIXES, is_dicom, read_image
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.utils.paths import expand_path

log = logging.getLogger(__name__)

# "isbi2015:test1" or "isbi2015:test1@/some/root"; a registry name is a plain word.
_SPLIT_ENTRY = re.compile(r"^(?P<dataset>[\w.-]+):(?P<split>[\w.-]+)(?:@(?P<root>.+))?$")


def find_images(folder: str | Path) -> list[Path]:
    """Every image under `folder` (recursive), sorted. DataError if the folder is missing.

    Suffixes are IMAGE_SUFFIXES, case-insensitive; suffix-less files count when they carry the
    DICOM magic. Hidden files and folders (".*", e.g. macOS "._x.png" resource forks, which
    are not images) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    found = []
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or (path.suffix == "" and is_dicom(path)):
            found.append(path)
    return sorted(found)


def image_id(path: str | Path) -> str:
    """File name minus an image suffix: "151.png" -> "151", but a suffix-less DICOM named
    "1.2.840.5" keeps its whole name (Path.stem would cut it at the last dot)."""
    name = Path(path).name
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


@dataclass
class UnlabeledPool:
    name: str
    root: Path
    paths: list[Path]                   # resolved, sorted, after exclusion
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ExclusionReport:
    """How many images each exclusion entry removed (an image matched by two entries counts
    under both, so the per-rule counts may sum to more than `excluded`)."""
    found: int = 0
    kept: int = 0
    per_rule: dict[str, int] = field(default_factory=dict)
    # Kept images that do not decode, left out under data.on_bad_sample=skip (their messages).
    unreadable: list[str] = field(default_factory=list)

    @property
    def excluded(self) -> int:
        return self.found - self.kept

    def summary(self) -> str:
        rules = ", ".join(f"{rule!r}: {n}" for rule, n in self.per_rule.items()) or "none"
        left_out = f", {len(self.unreadable)} of them unreadable and left out " \
            f"(data.on_bad_sample=skip)" if self.unreadable else ""
        return (f"{self.found} images found, {self.excluded} excluded ({rules}), "
                f"{self.kept} kept{left_out}")


class MixedPools:
    """Several UnlabeledPools seen as one indexable list (pool order, then sorted paths)."""

    def __init__(self, pools: Sequence[UnlabeledPool], report: Optional[ExclusionReport] = None):
        if not pools:
            raise ConfigError("unlabeled.pools: no pretraining pools configured")
        for p in pools:
            if not (np.isfinite(p.weight) and p.weight > 0):
                raise ConfigError(f"unlabeled pool '{p.name}': weight must be > 0, got {p.weight}")
            if not p.paths:
                raise DataError(f"unlabeled pool '{p.name}' ({p.root}) has no images")
        self.pools = list(pools)
        self.report = report or ExclusionReport()
        self._items = [(p.name, path) for p in self.pools for path in p.paths]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> np.ndarray:
        """float32 (H, W) image in [0, 1] (read_image: 8/16-bit and DICOM alike)."""
        return read_image(self._items[index][1])

    def items(self) -> list[tuple[str, Path]]:
        """(pool name, image path) for every image, in index order: deterministic."""
        return list(self._items)

    @property
    def paths(self) -> list[Path]:
        return [path for _, path in self._items]

    def path(self, index: int) -> Path:
        return self._items[index][1]


# ----------------------------------------------------------------------------------------------
# Exclusions
# ----------------------------------------------------------------------------------------------

@dataclass
class _Rule:
    entry: str
    paths: set[Path] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def matches(self, path: Path) -> bool:
        return path in self.paths or image_id(path) in self.ids


def parse_exclusion(entry: str) -> _Rule:
    """Turn one UnlabeledConfig.exclude entry into the paths and ids it excludes."""
    entry = entry.strip()
    rule = _Rule(entry)
    split_match = _SPLIT_ENTRY.match(entry)
    as_path = expand_path(entry)
    if split_match and not as_path.exists():
        # Imported here: the registry imports every reader, pools need none of them otherwise.
        from ddpm_landmarks.data.registry import build_dataset
        dataset, split, root = split_match.group("dataset", "split", "root")
        try:
            records = build_dataset(DataConfig(dataset=dataset, root=root or "")).split(split).records
        except (DataError, ConfigError) as err:  # unknown dataset or split: say which entry
            raise type(err)(f"exclusion {entry!r}: {err}") from err
        rule.paths = {Path(r.image_path).resolve() for r in records}
    elif as_path.is_file():
        for line in as_path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "/" in line or "\\" in line:
                rule.paths.add((as_path.parent / line).resolve())
            else:
                rule.ids.add(image_id(line))
    elif "/" in entry or "\\" in entry or entry.endswith(".txt"):
        raise DataError(f"exclusion list not found: {entry}")
    elif entry:
        rule.ids.add(image_id(entry))
    return rule


def apply_exclusions(paths: Sequence[Path], rules: Sequence[_Rule],
                     report: ExclusionReport) -> list[Path]:
    """The paths no rule matches; counts go into `report` (per_rule accumulates over calls)."""
    kept = []
    for path in paths:
        hits = [rule for rule in rules if rule.matches(path)]
        for rule in hits:
            report.per_rule[rule.entry] = report.per_rule.get(rule.entry, 0) + 1
        if not hits:
            kept.append(path)
    report.found += len(paths)
    report.kept += len(kept)
    return kept


def build_pools(cfg: UnlabeledConfig) -> MixedPools:
    """Find every pool's images, drop the excluded ones, and mix them by weight.

    Paths are resolved (symlinks followed) so that exclusion by path is exact. An image found
    in two pools (overlapping folders) is kept in the first only, with a warning: otherwise it
    would be drawn more often than its pools' weights say. Raises DataError for a missing or
    empty pool folder, or one whose every image was excluded.
    """
    if not cfg.pools:
        raise ConfigError("unlabeled.pools: no pretraining pools configured")
    rules = [parse_exclusion(entry) for entry in cfg.exclude if entry.strip()]
    report = ExclusionReport(per_rule={rule.entry: 0 for rule in rules})
    seen: set[Path] = set()
    pools = []
    for pool_cfg in cfg.pools:
        if not pool_cfg.path:
            raise ConfigError("unlabeled.pools: a pool has an empty path")
        root = expand_path(pool_cfg.path)
        name = pool_cfg.name or root.resolve().name
        found = [p.resolve() for p in find_images(root)]
        if not found:
            raise DataError(f"unlabeled pool '{name}': no images found in {root}")
        duplicates = [p for p in found if p in seen]
        if duplicates:
            log.warning("unlabeled pool '%s': %d images already in an earlier pool are skipped "
                        "(e.g. %s)", name, len(duplicates), duplicates[0])
            found = [p for p in found if p not in seen]
            if not found:
                raise DataError(f"unlabeled pool '{name}' ({root}): all its images are "
                                f"already in earlier pools")
        seen.update(found)
        kept = apply_exclusions(found, rules, report)
        if not kept:
            raise DataError(f"unlabeled pool '{name}' ({root}): all {len(found)} images excluded")
        pools.append(UnlabeledPool(name=name, root=root.resolve(), paths=kept,
                                   weight=pool_cfg.weight))
    for rule in rules:
        if report.per_rule[rule.entry] == 0:
            log.warning("exclusion %r matched no pretraining image (typo?)", rule.entry)
    log.info("pretraining pools: %s", report.summary())
    return MixedPools(pools, report)


def image_list_text(paths: Sequence[str | Path]) -> str:
    """Every pretraining image path (absolute, one per line), for audits. The header lines
    start with "#", so the file can be passed back as an exclusion list."""
    lines = [f"# {len(paths)} pretraining images, one absolute path per line (id = file stem)"]
    lines += [str(Path(p).resolve()) for p in paths]
    return "\n".join(lines) + "\n"
