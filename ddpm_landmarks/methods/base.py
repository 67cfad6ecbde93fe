"""What a pretraining method gives the training engine, so one engine serves every method.

The engine owns the loop (accelerate, mixed precision, accumulation, EMA, checkpoints, logging);
a method owns the network and says what a step's loss is, what to show, and what to export:

    method = METHODS[name](cfg)
    model = accelerator.prepare(method.model)          # DDP / compile wrapper
    loss, logs = method.loss(model, batch, generator)  # the wrapper, so DDP syncs gradients
    grids = method.log_images(ema_or_unwrapped_model, batch)
    method.export(unwrapped_model, run_dir / "export", to_dict(cfg))

`model` is passed explicitly (instead of using `self.model`) because the engine trains a
wrapped copy and samples/exports with the EMA or unwrapped one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


def this_process_slice(local_batch: int) -> tuple[int, slice]:
    """(global batch, this process's slice of it) under accelerate (1 process: everything).

    The engine hands every process the SAME generator state for a micro-step. A method draws
    its randomness (timesteps, noise, augmentations) for the global batch and keeps its slice,
    so N processes x batch b draw exactly what 1 process x batch N*b draws: the multi-process
    run is the single-process run, sharded.
    """
    from accelerate import PartialState
    state = PartialState()
    start = state.process_index * local_batch
    return local_batch * state.num_processes, slice(start, start + local_batch)


@runtime_checkable
class Method(Protocol):
    model: torch.nn.Module
    """The network being trained; the engine prepares (wraps) it and keeps its EMA."""

    def loss(self, model: torch.nn.Module, batch: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one micro-batch (B, C, H, W) in [-1, 1], plus scalars to log.

        `generator` is shared by all processes (see this_process_slice)."""
        ...

    def log_images(self, model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named image grids, float in [0, 1], (3 or 1, H, W); leaves `model`'s train/eval mode."""
        ...

    def export(self, model: torch.nn.Module, out_dir: Path, config_dict: dict) -> None:
        """Write the trained network (+ what is needed to use it) to `out_dir`, atomically."""
        ...
