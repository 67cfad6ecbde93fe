"""Config sections of every training run (pretraining, fine-tuning, classification): the
optimiser, the engine (steps, batches, precision, EMA, checkpoints, validation cadence) and the
experiment logger.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    max_grad_norm: Optional[float] = 1.0  # clipping threshold; None = no clipping
    # norm: scale the gradient to a total L2 norm <= max_grad_norm (ours); value: clamp every
    # component to [-max_grad_norm, max_grad_norm] (the released DDPM code's clip_grad_value_).
    clip_mode: Literal["norm", "value"] = "norm"


@dataclass
class TrainConfig:
    max_steps: int = 1000               # optimiser steps (not micro-batches)
    batch_size: int = 16                # per process, per micro-batch
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema: bool = True
    ema_decay: float = 0.9999
    # True: the decay grows with the step, min(ema_decay, (1 + t) / (10 + t)) (diffusers' EMA);
    # False: ema_decay from the first optimiser step (the released DDPM code's EMA).
    ema_warmup: bool = True
    checkpoint_every: int = 500         # optimiser steps; 0 = only at the end
    keep_checkpoints: int = 3
    resume: str = ""                    # "" | "latest" | path of a checkpoint folder
    num_workers: int = 2
    compile: bool = False
    channels_last: bool = False
    log_every: int = 10
    image_every: int = 500              # sample / reconstruction grids; 0 = never
    # Validation (fine-tuning): every eval_every optimiser steps the method's validation runs
    # (val MRE on the few-shot validation images); the best weights are kept in run_dir/best.
    eval_every: int = 0                 # 0 = never
    early_stopping_patience: int = 0    # stop after this many evaluations without improvement; 0 = off
    # Optimiser steps with a non-finite loss or gradient norm are skipped; more than this many
    # in a row stop the run (training/engine.py).
    max_nonfinite_steps: int = 10
    seed: int = 0


@dataclass
class LoggerConfig:
    kind: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "ddpm-landmarks"
    entity: str = ""
    # auto = online with a W&B API key, offline otherwise (a local run `wandb sync` uploads).
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # W&B run group and tags; the grid runner sets group = the grid's name and tags = the cell
    # (dataset, init, budget, seed), so a dashboard can group and filter the runs of a grid.
    group: str = ""
    tags: list[str] = field(default_factory=list)
