"""What a method gives the training engine, so one engine serves every training.

The engine owns the loop (accelerate, mixed precision, accumulation, EMA, checkpoints, logging);
a method owns the network and says what a step's loss is, what to show, and what to export:

    method = PRETRAINING_METHODS[name](cfg)          # methods/registry.py
    model = accelerator.prepare(method.model)          # DDP / compile wrapper
    loss, logs = method.loss(model, batch, generator)  # the wrapper, so DDP syncs gradients
    grids = method.log_images(ema_or_unwrapped_model, batch)
    method.export(unwrapped_model, run_dir / "export", to_dict(cfg))

`model` is passed explicitly (instead of using `self.model`) because the engine trains a
wrapped copy and samples/exports with the EMA or unwrapped one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

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


class Method:
    """Base class of every method. Subclasses implement `loss`, `log_images` and `export`, and
    may override the optional members, whose defaults say "not supported / nothing to do"."""

    model: torch.nn.Module
    """The network being trained; the engine prepares (wraps) it and keeps its EMA."""

    def loss(self, model: torch.nn.Module, batch,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one micro-batch, plus scalars to log. `generator` is shared
        by all processes (see this_process_slice)."""
        raise NotImplementedError

    def log_images(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        """Named image grids, float in [0, 1], (3 or 1, H, W); leaves `model`'s train/eval mode."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, out_dir: Path, config_dict: dict) -> None:
        """Write the trained network (+ what is needed to use it) to `out_dir`, atomically."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------
    # (model, images) -> feature maps for the pretraining landmark probe (training/probe.py);
    # None: the method's network cannot be probed.
    probe_features: Optional[Callable[[torch.nn.Module, torch.Tensor],
                                      list[torch.Tensor]]] = None

    def check_data(self, num_images: int) -> None:
        """Called before training with the number of training images; raise (ValueError) or
        warn when the method cannot work with that many. Default: any number is fine."""
