"""The training engine's samplers: an order of items per epoch that depends only on (seed,
epoch), identical on every process and after a resume (the engine skips the batches of an
interrupted epoch that were already used).

    sampler.set_epoch(epoch)                         # before each epoch
    sampler.set_step_layout(steps_before, batch_size, num_processes, grad_accum)
    values = sampler.scalars(step)                   # logged with the loss, e.g. train/stage

Samplers have no `generator` attribute on purpose, so accelerate neither replaces nor re-seeds
them. EpochShuffleSampler is the default; data/curriculum.py's CurriculumSampler uses the step
layout to give each item the curriculum stage of the optimiser step it trains in.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Base of the engine's samplers: set_epoch, and the optional step layout and scalars
    (defaults: ignored, none)."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = int(num_items), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_step_layout(self, steps_before: int, batch_size: int, num_processes: int,
                        grad_accum: int) -> None:
        """Optimiser steps done before this epoch's first item, and how items map to steps."""

    def scalars(self, step: int) -> dict[str, float]:
        """Values to log at optimiser step `step`."""
        return {}

    def __len__(self) -> int:
        return self.num_items


class EpochShuffleSampler(EpochSampler):
    """A permutation seeded by (seed, epoch); the identity order without shuffle."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        super().__init__(num_items, seed)
        self.shuffle = shuffle

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_items))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=gen).tolist())
