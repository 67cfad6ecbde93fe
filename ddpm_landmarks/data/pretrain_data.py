"""Images for DDPM pretraining: the unlabelled pools (+ labelled splits), resized and mildly augmented.

    pools = build_pretrain_pools(cfg)                   # MixedPools, exclusions applied
    images = PretrainImages(pools, cfg.data.image_size, cfg.data.resize_mode, cfg.augment)
    epoch = pool_weighted_subset(images, seed=cfg.train.seed)   # unequal pool weights

(data/pretrain_sets.py builds the right dataset for a pretraining config: these images, the SSL
methods' two views, or a curriculum.)

Items are float32 tensors (1, S, S) in [-1, 1] (the range DDPM noise schedules assume), from
the [0, 1] image by data.intensity_norm (data/intensity.py: the file's range or per-image
min-max, after resize and augmentation).

Which images: the kept images of cfg.unlabeled.pools, plus, when cfg.unlabeled.labelled_splits
is set, the images of those splits of cfg.data.dataset, each split one more pool of weight 1.0
(there is no config key for it). The exclusion rules (cfg.unlabeled.exclude) apply to both, and
an image already in an earlier pool is not added twice. With cfg.data.on_bad_sample=skip the
kept images are decoded once (data/record_checks.py) and those that do not decode are left out
and counted in the report, so that none is met mid-training.

Mixing by weight: pool_slots gives pool p a share of an epoch proportional to its weight,
whatever its size; pool_weighted_subset wraps that as a Subset for the engine's uniform
shuffle. Seed it the same on every process (accelerate shards one shared stream).

Randomness: per item (data/randomness.py): item i of epoch e is augmented from a generator
seeded by (seed, e, i), whatever the worker, so a resumed run replays its augmentations. No
horizontal flips: anatomy has a side, and a flipped chest or spine is an image the model should
never learn as normal.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig
from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.data.intensity import random_intensity, to_model_input
from ddpm_landmarks.data.patches import random_crop_matrix
from ddpm_landmarks.data.randomness import ItemRandomness
from ddpm_landmarks.data.record_checks import check_images
from ddpm_landmarks.data.transforms import (
    original_to_model_matrix,
    random_affine_matrix,
    warp_image,
)
from ddpm_landmarks.data.unlabeled import (
    ExclusionReport,
    MixedPools,
    UnlabeledPool,
    apply_exclusions,
    build_pools,
    parse_exclusion,
)
from ddpm_landmarks.errors import ConfigError, DataError

log = logging.getLogger(__name__)



class PretrainImages(ItemRandomness, torch.utils.data.Dataset):
    """MixedPools -> (1, S, S) float32 tensors in [-1, 1] on the model grid.

    augment=None: only the deterministic resize (for previews and tests); otherwise a random
    affine (rotation / scale / shear / translation, never a flip) and intensity augmentation.
    crop_grid > 0: instead of the whole image, a random S x S crop at crop_grid pixels across
    the image's long side (config.pretrain.CropConfig, data/patches.random_crop_matrix).
    """

    def __init__(self, pools: MixedPools, image_size: int, resize_mode: str = "stretch",
                 augment: Optional[AugmentConfig] = None, seed: int = 0,
                 intensity_norm: str = "fixed", crop_grid: int = 0):
        if augment is not None and augment.flip_prob > 0:
            raise ConfigError(f"augment.flip_prob={augment.flip_prob}: pretraining never flips "
                              "(anatomy has a side); set augment.flip_prob=0")
        if resize_mode not in ("stretch", "letterbox"):
            raise ConfigError(f"data.resize_mode: {resize_mode!r} is not stretch | letterbox")
        # OpenCV's thread pool is not fork-safe: a DataLoader worker forked while a pool thread
        # holds its mutex deadlocks on its first cv2 call (seen in tests). Parallelism comes
        # from the workers anyway, so OpenCV runs single-threaded in this process and its
        # forks (a process-wide setting; it only costs speed of other cv2 calls).
        cv2.setNumThreads(0)
        self.pools = pools
        self.size = int(image_size)
        self.resize_mode = resize_mode
        self.augment = augment
        to_model_input(np.zeros((1, 1), np.float32), intensity_norm)   # ValueError if unknown
        self.intensity_norm = intensity_norm
        self.seed = int(seed)
        self.crop_grid = int(crop_grid)

    def __len__(self) -> int:
        return len(self.pools)

    @property
    def paths(self) -> list[Path]:
        return self.pools.paths

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """float32 (S, S) in [0, 1]: read, resize (area-antialiased), augment with `rng`."""
        image = read_image(self.pools.path(index))   # DataError naming the file if unreadable
        h, w = image.shape
        if self.crop_grid > 0:
            matrix = random_crop_matrix(rng, (w, h), self.crop_grid, self.size)
        else:
            matrix = original_to_model_matrix((w, h), self.size, self.resize_mode)
        if self.augment is not None:
            matrix = random_affine_matrix(rng, self.augment, self.size) @ matrix
        # One warp for resize + augmentation: a single interpolation, antialiased on shrink.
        image = warp_image(image, matrix, self.size,
                           self.augment.border if self.augment is not None else "constant")
        if self.augment is not None:
            image = random_intensity(image, rng, self.augment)
        return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.load(int(index), self.item_rng(index))
        return torch.from_numpy(to_model_input(image, self.intensity_norm)).unsqueeze(0)


def pool_slots(pools, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices into the concatenation of `pools` (UnlabeledPools), grouped by pool, in
    proportion to the pool weights: pool p gets round(size * w_p / sum w) slots (largest
    remainder, so they sum to size), filled by cycling through an rng permutation of its
    images: a small, heavily weighted pool repeats, a large one is subsampled."""
    weights = np.array([p.weight for p in pools], dtype=np.float64)
    exact = size * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: size - counts.sum()]] += 1
    indices, offset = [], 0
    for pool, count in zip(pools, counts):
        order = offset + rng.permutation(len(pool))
        indices.append(np.resize(order, count))
        offset += len(pool)
    return np.concatenate(indices).astype(np.int64)


def pool_weighted_subset(dataset: PretrainImages, epoch_size: Optional[int] = None,
                         seed: int = 0) -> torch.utils.data.Subset:
    """A Subset whose items are the pools in proportion to their weights (pool_slots, seeded),
    for loaders that shuffle uniformly (e.g. the training engine's epoch sampler); epoch_size
    defaults to len(dataset)."""
    size = len(dataset) if epoch_size is None else int(epoch_size)
    slots = pool_slots(dataset.pools.pools, size, np.random.default_rng(seed))
    return torch.utils.data.Subset(dataset, slots.tolist())


def _labelled_split_pools(cfg, seen: set[Path], report: ExclusionReport) -> list[UnlabeledPool]:
    """One pool per cfg.unlabeled.labelled_splits entry, exclusions applied (into `report`)."""
    from ddpm_landmarks.data.registry import build_dataset  # imports every reader
    dataset = build_dataset(cfg.data)   # first: a synthetic set is generated before exclusions
    rules = [parse_exclusion(e) for e in cfg.unlabeled.exclude if e.strip()]
    for rule in rules:
        report.per_rule.setdefault(rule.entry, 0)
    pools = []
    for split in cfg.unlabeled.labelled_splits:
        name = f"{cfg.data.dataset}:{split}"
        found = sorted({Path(r.image_path).resolve() for r in dataset.split(split).records})
        fresh = [p for p in found if p not in seen]
        if len(fresh) < len(found):
            log.warning("labelled split '%s': %d images already in an earlier pool are skipped",
                        name, len(found) - len(fresh))
        if not fresh:
            raise DataError(f"labelled split '{name}': all its images are already in earlier pools")
        seen.update(fresh)
        kept = apply_exclusions(fresh, rules, report)
        if not kept:
            raise DataError(f"labelled split '{name}': all {len(fresh)} images excluded by "
                            f"unlabeled.exclude")
        pools.append(UnlabeledPool(name=name, root=found[0].parent, paths=kept, weight=1.0))
    return pools


def _decodable(pool: UnlabeledPool, report: ExclusionReport) -> UnlabeledPool:
    """The pool without the images that do not decode (their messages go into `report`)."""
    checked = check_images(pool.paths)
    bad = [checked[p].problem for p in pool.paths if checked[p].problem is not None]
    if not bad:
        return pool
    report.unreadable += bad
    log.warning("pool '%s': %d image(s) do not decode and are left out (on_bad_sample=skip); "
                "first: %s", pool.name, len(bad), bad[0])
    kept = [p for p in pool.paths if checked[p].problem is None]
    if not kept:
        raise DataError(f"unlabeled pool '{pool.name}' ({pool.root}): none of its "
                        f"{len(pool.paths)} images decodes; first: {bad[0]}")
    return UnlabeledPool(name=pool.name, root=pool.root, paths=kept, weight=pool.weight)


def build_pretrain_pools(cfg) -> MixedPools:
    """The MixedPools of a PretrainConfig: cfg.unlabeled.pools, then the labelled splits."""
    un = cfg.unlabeled
    if not un.pools and not un.labelled_splits:
        raise DataError(
            "no pretraining images configured: set unlabeled.pools (e.g. "
            "[{path: \"${DDPM_LANDMARKS_DATA}/chest_unlabeled\", weight: 1.0}]) and/or "
            "unlabeled.labelled_splits (e.g. [train]: the images of that split of data.dataset)")
    if un.pools:
        mixed = build_pools(un)   # DataError naming a missing, empty or fully excluded pool
        pools, report = list(mixed.pools), mixed.report
    else:
        pools, report = [], ExclusionReport()
    if un.labelled_splits:
        seen = {p for pool in pools for p in pool.paths}
        pools += _labelled_split_pools(cfg, seen, report)
    if cfg.data.on_bad_sample == "skip":
        pools = [_decodable(pool, report) for pool in pools]
    result = MixedPools(pools, report)
    if len(result) == 0:   # cannot happen (every pool is checked), but never train on nothing
        raise DataError(f"no pretraining images in pools {[p.name for p in pools]}")
    return result
