"""Curricular pretraining: stages that change the data pools, the augmentation strength and the
resolution at configured optimiser steps, for every pretraining method (DDPM and the SSL
baselines), after "Self-supervised curricular deep learning for chest x-ray image
classification" (2023): pretraining data staged from generic to in-domain.

    curriculum:                          # PretrainConfig.curriculum (config/pretrain.py)
      stages:
        - {name: generic,   until_step: 2000, pools: {chest: 1.0}}
        - {name: mixed,     until_step: 4000, pools: {chest: 1.0, spine: 1.0}}
        - {name: in-domain, pools: {"isbi2015:train": 1.0}, augment_strength: 1.5}

    curriculum = build_curriculum(cfg, pools, seed)   # data/pretrain_sets.py does this
    images = CurriculumImages(curriculum, seed)
    sampler = CurriculumSampler(curriculum, len(images), seed=cfg.train.seed)

A stage trains the optimiser steps after the previous stage's `until_step` up to and including
its own (the last stage's None = to train.max_steps). Per stage:
- pools: {pool name: weight}, names as in unlabeled.pools[].name (default: the folder name) or
  "<dataset>:<split>" for unlabeled.labelled_splits; {} = every pool at its configured weight.
  All pools are found and filtered by unlabeled.exclude once; a stage only re-weights them;
- augment_strength m: every augmentation RANGE scaled by m (scale_augment / scale_views):
  widths linearly (rotation, translation, shear, brightness, contrast, noise, blur sigma),
  ranges around 1 in log space (gamma, crop aspect: r -> r^m), the isotropic scale and the
  crop area towards 1 (1 + (s - 1) m). m = 0 is the identity, m = 1 the config. Probabilities
  (flip, CLAHE, blur, jitter) are kept: they say how often, not how much. Then `augment`
  (DDPM) or `views` (SSL) set explicit values;
- image_size: the stage's training resolution (None = data.image_size). The probe, the image
  logs and the export stay on data.image_size.

Same stage on every process at the same step, also after a resume: the sampler is a pure
function of (seed, epoch, the engine's step count at the epoch start, batch size, processes,
accumulation; the engine passes the last four before each epoch: set_step_layout). Position j
of an epoch trains in step steps_before + (j // (batch_size * num_processes)) // grad_accum + 1
(accelerate hands the W batches of a round to the W processes and syncs every grad_accum
micro-batches and at each epoch end), so a micro-batch has one stage and one resolution. Within
a stage items come in rounds: a shuffled pool_slots multiset of the stage's size (equal
weights: every image once per round), seeded by (seed, epoch, stage).

Audit (run folder, written by data/pretrain_sets.py): pretrain_images.txt (every image of any
stage; an exclusion file), pretrain_images_stage<i>.txt, curriculum.json (the resolved stages).
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig
from ddpm_landmarks.config.schema import from_dict, to_dict
from ddpm_landmarks.data.pretrain_data import PretrainImages, pool_slots
from ddpm_landmarks.data.samplers import EpochSampler
from ddpm_landmarks.data.unlabeled import MixedPools
from ddpm_landmarks.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CURRICULUM_FILE = "curriculum.json"
STAGE_SEED_STRIDE = 1_000_003      # augmentation seeds of stage i: seed + i * stride
STAGE_SCALAR = "train/stage"


def stage_image_list(index: int) -> str:
    return f"pretrain_images_stage{index}.txt"


# ----------------------------------------------------------------------------------------------
# Augmentation strength
# ----------------------------------------------------------------------------------------------

def _around_one(pair, m: float) -> tuple[float, float]:
    return tuple(1.0 + (float(v) - 1.0) * m for v in pair)


def _log_scaled(pair, m: float) -> tuple[float, float]:
    return tuple(float(v) ** m for v in pair)


def scale_augment(aug: AugmentConfig, m: float) -> AugmentConfig:
    """augment (DDPM pretraining) with every range scaled by m (module docstring)."""
    scale = _around_one(aug.scale, m)
    if not min(scale) > 0:
        raise ConfigError(f"augment_strength={m:g} turns augment.scale={list(aug.scale)} into "
                          f"{[round(s, 4) for s in scale]}: scales must stay > 0")
    return dataclasses.replace(
        aug, rotation_deg=aug.rotation_deg * m, scale=scale, translate=aug.translate * m,
        shear_deg=aug.shear_deg * m, brightness=aug.brightness * m, contrast=aug.contrast * m,
        gamma=_log_scaled(aug.gamma, m), noise_std=aug.noise_std * m,
        blur_sigma=tuple(s * m for s in aug.blur_sigma))


def scale_views(views, m: float):
    """ssl.views (a ViewConfig) with every range scaled by m (module docstring); the crop
    area fraction moves towards 1 (m = 0: the whole grid)."""
    return dataclasses.replace(
        views, crop_scale=_around_one(views.crop_scale, m),
        crop_ratio=_log_scaled(views.crop_ratio, m), rotation_deg=views.rotation_deg * m,
        brightness=views.brightness * m, contrast=views.contrast * m,
        gamma=_log_scaled(views.gamma, m), blur_sigma=tuple(s * m for s in views.blur_sigma),
        noise_std=views.noise_std * m)


def _with_values(section, values: dict[str, Any], where: str):
    """section with explicit values, checked like a config file (unknown key, wrong type)."""
    if not values:
        return section
    return from_dict(type(section), {**to_dict(section), **values}, prefix=where)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

@dataclass
class Stage:
    index: int
    name: str
    first_step: int                     # 1-based optimiser steps, inclusive
    last_step: int
    pools: MixedPools
    image_size: int
    augment: Optional[AugmentConfig]    # DDPM
    views: Any                          # SSL (a ViewConfig)
    dataset: torch.utils.data.Dataset   # PretrainImages or TwoViewImages

    def describe(self) -> dict:
        return {"index": self.index, "name": self.name, "first_step": self.first_step,
                "last_step": self.last_step, "image_size": self.image_size,
                "images": len(self.pools),
                "pools": [{"name": p.name, "weight": p.weight, "images": len(p)}
                          for p in self.pools.pools],
                "augment": None if self.augment is None else to_dict(self.augment),
                "views": None if self.views is None else to_dict(self.views)}


class Curriculum:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self._last_steps = [s.last_step for s in stages]

    def index_at(self, step: int) -> int:
        """Stage index of optimiser step `step` (1-based); after the last stage: the last."""
        return min(bisect.bisect_left(self._last_steps, step), len(self.stages) - 1)

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.index_at(step)]

    @property
    def paths(self) -> list[Path]:
        """Every image of any stage, each once, in stage order."""
        seen: dict[Path, None] = {}
        for stage in self.stages:
            seen.update(dict.fromkeys(stage.pools.paths))
        return list(seen)


def stage_spans(stages, max_steps: int) -> list[tuple[int, int]]:
    """(first, last) optimiser step of each CurriculumStage; ConfigError for stages out of
    order, a stage that could never train, or steps that no stage covers."""
    if not stages:
        raise ConfigError("curriculum.stages is empty")
    spans, previous = [], 0
    for i, stage in enumerate(stages):
        where = f"curriculum.stages[{i}]" + (f" ({stage.name})" if stage.name else "")
        last = i == len(stages) - 1
        end = stage.until_step
        if end is None:
            if not last:
                raise ConfigError(f"{where}: until_step is missing; only the last stage may "
                                  f"leave it empty (= to train.max_steps)")
            end = max_steps
        if end <= previous:
            raise ConfigError(f"{where}: until_step={end} is not after the previous stage's "
                              f"end (step {previous}); stages are listed in training order, "
                              f"each ending later than the one before")
        if not last and end >= max_steps:
            raise ConfigError(f"{where}: ends at step {end} >= train.max_steps={max_steps}, so "
                              f"curriculum.stages[{i + 1}] would never train")
        if last and end < max_steps:
            raise ConfigError(f"{where}: the last stage ends at step {end} but train.max_steps="
                              f"{max_steps}; set its until_step to null (= to the end)")
        spans.append((previous + 1, min(end, max_steps)))
        previous = end
    return spans


def stage_pools(wanted: dict[str, float], pools: MixedPools, where: str) -> MixedPools:
    """The run's pools re-weighted for one stage ({} = all at their configured weights)."""
    names = [p.name for p in pools.pools]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{where}.pools: several pretraining pools are named {twice}; give "
                          f"each unlabeled.pools entry its own name")
    by_name = {p.name: p for p in pools.pools}
    if not wanted:
        chosen = list(pools.pools)
    else:
        chosen = []
        for name, weight in wanted.items():
            if name not in by_name:
                raise ConfigError(f"{where}.pools: unknown pool {name!r}; the pools of this run: "
                                  f"{', '.join(repr(n) for n in names)} (unlabeled.pools[].name, "
                                  f"else the folder name; '<dataset>:<split>' for "
                                  f"unlabeled.labelled_splits)")
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"{where}.pools.{name}: weight must be > 0, got {weight} (to "
                                  f"leave a pool out of a stage, do not list it)")
            chosen.append(dataclasses.replace(by_name[name], weight=float(weight)))
    empty = [p.name for p in chosen if not p.paths]
    if empty or not chosen:
        raise DataError(f"{where}: no images to train on (empty pools: {empty or 'none listed'})")
    return MixedPools(chosen, pools.report)


def _check_resolution(size: int, where: str) -> None:
    # The model's own limits (e.g. the DDPM U-Net's depth) are checked by the pretraining script
    # (pretrain.check_stage_resolutions) before any data is built.
    if not (isinstance(size, int) and size > 0):
        raise ConfigError(f"{where}.image_size: {size!r} is not a positive number of pixels")


def build_curriculum(cfg, pools: MixedPools, seed: int, views=None) -> Curriculum:
    """The resolved stages of cfg.curriculum over the run's pools (views: cfg.ssl.views for
    an SSL method, else None: DDPM images with cfg.augment)."""
    from ddpm_landmarks.data.ssl_views import TwoViewImages, check_views
    method = getattr(cfg, "method", "ddpm")
    stages = []
    spans = stage_spans(cfg.curriculum.stages, cfg.train.max_steps)
    for i, (spec, (first, last)) in enumerate(zip(cfg.curriculum.stages, spans)):
        where = f"curriculum.stages[{i}]"
        strength = spec.augment_strength
        if not (math.isfinite(strength) and strength >= 0):
            raise ConfigError(f"{where}.augment_strength must be >= 0, got {strength}")
        size = cfg.data.image_size if spec.image_size is None else spec.image_size
        _check_resolution(size, where)
        chosen = stage_pools(spec.pools, pools, where)
        stage_seed = seed + STAGE_SEED_STRIDE * i
        if views is not None:
            if spec.augment:
                raise ConfigError(f"{where}.augment: method {method!r} trains on two views "
                                  f"(ssl.views); set {where}.views instead")
            stage_views = _with_values(scale_views(views, strength), spec.views, f"{where}.views")
            try:
                check_views(stage_views)
            except ConfigError as err:
                raise ConfigError(f"{where} (augment_strength={strength:g}): {err}") from None
            augment, dataset = None, TwoViewImages(chosen, size, stage_views,
                                                   cfg.data.resize_mode, seed=stage_seed,
                                                   intensity_norm=cfg.data.intensity_norm)
        else:
            if spec.views:
                raise ConfigError(f"{where}.views: ssl.views are for the SSL methods; method "
                                  f"{method!r} is augmented by {where}.augment")
            augment = _with_values(scale_augment(cfg.augment, strength), spec.augment,
                                   f"{where}.augment")
            stage_views, dataset = None, PretrainImages(chosen, size, cfg.data.resize_mode,
                                                        augment, seed=stage_seed,
                                                        intensity_norm=cfg.data.intensity_norm)
        stages.append(Stage(i, spec.name or f"stage{i}", first, last, chosen, size, augment,
                            stage_views, dataset))
    used = {p.name for s in stages for p in s.pools.pools}
    for pool in pools.pools:
        if pool.name not in used:
            log.warning("curriculum: pool %r is configured but no stage trains on it", pool.name)
    return Curriculum(stages)


# ----------------------------------------------------------------------------------------------
# Dataset and sampler
# ----------------------------------------------------------------------------------------------

class CurriculumImages(torch.utils.data.Dataset):
    """Items keyed (stage index, index within the stage), as CurriculumSampler yields them.
    A plain int key gives the LAST stage's image (index modulo its size): the engine's fixed
    image-log batch shows what the model ends on. Length = the largest stage (an epoch)."""

    def __init__(self, curriculum: Curriculum, seed: int = 0):
        self.curriculum = curriculum
        self.datasets = [s.dataset for s in curriculum.stages]
        # Each stage's augmentation from its own seed: stages never replay another's draws.
        for i, dataset in enumerate(self.datasets):
            dataset.seed = int(seed) + STAGE_SEED_STRIDE * i

    def __len__(self) -> int:
        return max(len(d) for d in self.datasets)

    @property
    def smallest_stage(self) -> int:
        return min(len(d) for d in self.datasets)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            stage, index = (int(k) for k in key)
        else:
            stage = len(self.datasets) - 1
            index = int(key) % len(self.datasets[stage])
        return self.datasets[stage][index]


class CurriculumSampler(EpochSampler):
    """(stage, index) keys; the stage of each position is the one of the optimiser step it
    will train in (module docstring). The engine calls set_epoch and set_step_layout before
    each epoch and logs scalars(step). No `generator` attribute: accelerate must not replace
    or re-seed it."""

    def __init__(self, curriculum: Curriculum, epoch_size: int, seed: int = 0):
        super().__init__(epoch_size, seed)
        self.curriculum, self.epoch_size = curriculum, int(epoch_size)
        self.set_step_layout(steps_before=0, batch_size=1, num_processes=1, grad_accum=1)
        self._reported = None

    def set_step_layout(self, steps_before: int, batch_size: int, num_processes: int,
                        grad_accum: int) -> None:
        """Optimiser steps done before this epoch's first item, and how items map to steps."""
        self.steps_before, self.grad_accum = int(steps_before), int(grad_accum)
        self.items_per_round = int(batch_size) * int(num_processes)

    def step_of(self, position: int) -> int:
        """Optimiser step (1-based) that item `position` of this epoch trains in."""
        return self.steps_before + (position // self.items_per_round) // self.grad_accum + 1

    def _stream(self, stage: int) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, stage])
        pools = self.curriculum.stages[stage].pools
        while True:
            yield from rng.permutation(pool_slots(pools.pools, len(pools), rng)).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        streams: dict[int, Iterator[int]] = {}
        keys = []
        for position in range(self.epoch_size):
            stage = self.curriculum.index_at(self.step_of(position))
            if stage not in streams:
                streams[stage] = self._stream(stage)
            keys.append((stage, next(streams[stage])))
        return iter(keys)

    def __len__(self) -> int:
        return self.epoch_size

    def scalars(self, step: int) -> dict[str, float]:
        """What the engine logs at `step`: the stage index of that step."""
        stage = self.curriculum.stage_at(step)
        if stage.index != self._reported:
            log.info("curriculum: in stage %d (%s, steps %d-%d) at step %d: %d images from %s, "
                     "%d px", stage.index, stage.name, stage.first_step, stage.last_step, step,
                     len(stage.pools), ", ".join(f"{p.name} x{p.weight:g}"
                                                 for p in stage.pools.pools), stage.image_size)
            self._reported = stage.index
        return {STAGE_SCALAR: float(stage.index)}
