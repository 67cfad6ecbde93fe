"""Config sections of training runs, shared by pretraining, fine-tuning and SSL baselines.

    cfg = load_config("configs/pretrain/synthetic.yaml", overrides, cls=PretrainConfig)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ddpm_landmarks.config import (AugmentConfig, DataConfig, RunConfig, UnlabeledConfig)


@dataclass
class ModelConfig:
    preset: str = "tiny"                # tiny | small | base | paper (ddpm_landmarks.models.unet)
    sample_size: Optional[int] = None   # None = the preset's resolution (= data.image_size)
    gradient_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000     # the paper: 500
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: Optional[float] = None  # None = plain MSE; 5.0 = Hang et al. 2023
    sample_steps: int = 25              # DDIM steps for the logged sample grid
    num_samples: int = 8                # images in the logged grids


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1000               # optimiser steps (not micro-batches)
    batch_size: int = 16                # per process, per micro-batch
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True             # diffusers' EMA warm-up (decay grows with the step)
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
    seed: int = 0


@dataclass
class LoggerConfig:
    kind: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "ddpm-landmarks"
    entity: str = ""
    # auto = online with a W&B API key, offline otherwise (a local run `wandb sync` uploads).
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        rotation_deg=5.0, scale=(0.95, 1.05), translate=0.03, noise_std=0.0))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
