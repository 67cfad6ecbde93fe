"""The data of a pretraining config: which dataset, which sampler, which audit files.

    data = pretraining_data(cfg, seed=cfg.train.seed + rank, views=cfg.ssl.views or None)
    data.dataset, data.sampler, data.num_images, data.audit_files

- DDPM: PretrainImages (data/pretrain_data.py) of the pools, one augmented image per item;
- SSL methods (views given): TwoViewImages (data/ssl_views.py), two augmented views per item;
- with cfg.curriculum.stages: CurriculumImages and its CurriculumSampler (data/curriculum.py).
Pools of unequal weight give an epoch that is a weighted subset of the pools.

Audit files (written into the run folder by the pretraining script once every check passed):
pretrain_images.txt (every image trained on, usable as an exclusion file),
pretrain_exclusions.txt (what the exclusion rules removed, what each pool contributes), and for
a curriculum one image list per stage and curriculum.json.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from ddpm_landmarks.data.curriculum import (
    CURRICULUM_FILE,
    CurriculumImages,
    CurriculumSampler,
    build_curriculum,
    stage_image_list,
)
from ddpm_landmarks.data.pretrain_data import (
    PretrainImages,
    build_pretrain_pools,
    pool_weighted_subset,
)
from ddpm_landmarks.data.samplers import EpochSampler
from ddpm_landmarks.data.ssl_views import TwoViewImages
from ddpm_landmarks.data.unlabeled import MixedPools, image_list_text
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_LIST = "pretrain_images.txt"
EXCLUSION_REPORT = "pretrain_exclusions.txt"


@dataclass
class PretrainingData:
    dataset: Dataset                     # what the engine iterates
    sampler: Optional[EpochSampler]      # None: the engine's epoch shuffle
    num_images: int                      # distinct images (a curriculum: its smallest stage)
    audit_files: dict[str, str] = field(default_factory=dict)   # run-folder file -> text


def exclusion_summary(pools: MixedPools) -> str:
    """Text of pretrain_exclusions.txt: the exclusion report and what each pool contributes."""
    lines = [f"# pretraining images: {pools.report.summary()}"]
    lines += [f"rule {rule!r}: {n} excluded" for rule, n in pools.report.per_rule.items()]
    lines += [f"pool {p.name!r}: {len(p)} images, weight {p.weight:g}, root {p.root}"
              for p in pools.pools]
    return "\n".join(lines) + "\n"


def _curriculum_audit(curriculum, pools: MixedPools) -> dict[str, str]:
    files = {IMAGE_LIST: image_list_text(curriculum.paths)}
    for stage in curriculum.stages:
        files[stage_image_list(stage.index)] = image_list_text(stage.pools.paths)
    files[CURRICULUM_FILE] = json.dumps(
        {"stages": [s.describe() for s in curriculum.stages]}, indent=2) + "\n"
    lines = [f"stage {s.index} {s.name!r} (steps {s.first_step}-{s.last_step}, {s.image_size} "
             f"px): {len(s.pools)} images from " + ", ".join(
                 f"{p.name} x{p.weight:g}" for p in s.pools.pools) for s in curriculum.stages]
    files[EXCLUSION_REPORT] = exclusion_summary(pools) + "\n".join(lines) + "\n"
    return files


def build_pretrain_images(cfg, seed: Optional[int] = None, views=None
                          ) -> tuple[Dataset, dict[str, str]]:
    """(the images of a PretrainConfig, their audit files). `views`: a ViewConfig
    (cfg.ssl.views) for the SSL methods. `seed`: the augmentation seed (default cfg.train.seed;
    under accelerate pass seed + process index so that processes augment differently)."""
    pools = build_pretrain_pools(cfg)
    seed = cfg.train.seed if seed is None else seed
    crop_grid = cfg.crops.grid
    if crop_grid and (cfg.curriculum.stages or views is not None):
        raise ConfigError("crops.grid (pretraining on patches) is for DDPM pretraining without "
                          "a curriculum; set crops.grid=0")
    if cfg.curriculum.stages:
        curriculum = build_curriculum(cfg, pools, seed, views)
        for s in curriculum.stages:
            log.info("curriculum stage %d %r: steps %d-%d, %d images, %d px", s.index, s.name,
                     s.first_step, s.last_step, len(s.pools), s.image_size)
        return CurriculumImages(curriculum, seed), _curriculum_audit(curriculum, pools)
    if views is not None:
        images = TwoViewImages(pools, cfg.data.image_size, views, cfg.data.resize_mode, seed=seed,
                               intensity_norm=cfg.data.intensity_norm)
    else:
        images = PretrainImages(pools, cfg.data.image_size, cfg.data.resize_mode, cfg.augment,
                                 seed=seed, intensity_norm=cfg.data.intensity_norm,
                                 crop_grid=crop_grid)
    log.info("pretraining on %d images from %d pools", len(images), len(pools.pools))
    return images, {IMAGE_LIST: image_list_text(pools.paths),
                    EXCLUSION_REPORT: exclusion_summary(pools)}


def build_pretrain_dataset(cfg, run_dir: Optional[Path] = None, seed: Optional[int] = None,
                           views=None) -> Dataset:
    """The images of build_pretrain_images; their audit files are written into run_dir when
    given (tests, tools)."""
    images, files = build_pretrain_images(cfg, seed, views)
    if run_dir is not None:
        for name, text in files.items():
            atomic_write_text(Path(run_dir) / name, text)
    return images


def pretraining_data(cfg, seed: int, views=None) -> PretrainingData:
    """Dataset, sampler and audit files of a pretraining run (module doc)."""
    images, files = build_pretrain_images(cfg, seed, views)
    if isinstance(images, CurriculumImages):
        # Stages of pools / augmentation / resolution: the sampler gives each item the stage of
        # the optimiser step it trains in, the same on every process (data/curriculum.py).
        sampler = CurriculumSampler(images.curriculum, len(images), seed=cfg.train.seed)
        return PretrainingData(images, sampler, images.smallest_stage, files)
    if len({p.weight for p in images.pools.pools}) > 1:
        # Unequal pool weights: an epoch is a weighted subset of the pools (uniformly shuffled
        # by the engine); equal weights mean every image once per epoch.
        return PretrainingData(pool_weighted_subset(images, seed=cfg.train.seed), None,
                               len(images), files)
    return PretrainingData(images, None, len(images), files)
