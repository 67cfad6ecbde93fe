"""Config of a pretraining run: DDPM (model, diffusion) or an SSL baseline (ssl), the
landmark probe, the curriculum, on top of the shared data and training sections.

    cfg = load_config("configs/pretrain/synthetic.yaml", overrides, cls=PretrainConfig)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    RunConfig,
    UnlabeledConfig,
)
from ddpm_landmarks.config.training import LoggerConfig, OptimConfig, TrainConfig


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
class ViewConfig:
    """Two-view augmentation of the SSL baselines (data/ssl_views.py), gray x-rays only.

    Each view: a random resized crop of the model grid (area fraction `crop_scale`, aspect
    `crop_ratio`, torchvision's sampling), a rotation, an optional horizontal flip, then with
    probability `jitter_prob` gamma / contrast / brightness (SimCLR's colour jitter without
    hue and saturation), a Gaussian blur with probability `blur_prob`, and Gaussian noise.
    Defaults are ours for x-rays: the papers crop from 8-20 % of an ImageNet image and flip.
    """
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    rotation_deg: float = 10.0
    flip_prob: float = 0.0              # anatomy has a side: off unless asked for
    jitter_prob: float = 0.8            # SimCLR / MoCo v2 apply colour jitter with p = 0.8
    brightness: float = 0.2             # additive, uniform in [-b, b] (image in [0, 1])
    contrast: float = 0.2               # around the mean, factor uniform in [1 - c, 1 + c]
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_prob: float = 0.5              # SimCLR / MoCo v2: p = 0.5, sigma 0.1-2.0 px at 224 px
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # in pixels of the model grid
    noise_std: float = 0.01             # additive Gaussian noise (image in [0, 1])


@dataclass
class SSLConfig:
    """Contrastive SSL baselines (methods/simclr.py, moco_v2.py, moco_v3.py) on smp encoders.

    Fields left at None take the method's default (SSL_DEFAULTS), filled in by
    resolve_ssl_config before the run's config.yaml is written, so the run records the values.
    """
    encoder: str = "resnet18"           # segmentation_models_pytorch encoder name
    in_channels: int = 1                # 1 = gray x-ray; 3 = the gray image repeated
    proj_dim: Optional[int] = None      # projection output (SimCLR / MoCo v2 128, MoCo v3 256)
    hidden_dim: Optional[int] = None    # MLP hidden width; None: see SSL_DEFAULTS
    proj_layers: int = 2                # projection MLP depth (MoCo v3's ViT recipe uses 3)
    temperature: Optional[float] = None
    # MoCo v2 queue (the paper: 65536 of 1.28 M images). A multiple of the global batch, and
    # queue + global batch <= the number of images, else an image's own older key is among its
    # negatives (warned at the start of a run).
    queue_size: int = 1024
    momentum: Optional[float] = None    # MoCo v2 0.999; MoCo v3 0.99 (start of its cosine)
    momentum_end: float = 1.0           # MoCo v3: momentum at the last step
    sync_bn: bool = True                # SimCLR, MoCo v3: SyncBatchNorm across GPU processes
    shuffle_bn: bool = True             # MoCo v2: shuffle keys across processes (shuffling BN)
    views: ViewConfig = field(default_factory=ViewConfig)


# None-valued SSLConfig fields per method. hidden_dim "encoder" = the encoder's output channels
# (SimCLR and MoCo v2: 2048 = ResNet-50's), "2x encoder" = twice that (MoCo v3: 4096 for
# ResNet-50's 2048). Published values and our small-batch choices: see each method's docstring.
SSL_DEFAULTS: dict[str, dict] = {
    "simclr": {"temperature": 0.5, "proj_dim": 128, "hidden_dim": "encoder"},
    "moco_v2": {"temperature": 0.2, "proj_dim": 128, "hidden_dim": "encoder", "momentum": 0.999},
    "moco_v3": {"temperature": 1.0, "proj_dim": 256, "hidden_dim": "2x encoder",
                "momentum": 0.99},
}


def resolve_ssl_config(method: str, ssl: SSLConfig, encoder_channels: int) -> SSLConfig:
    """A copy of `ssl` with every None field set to `method`'s default (SSL_DEFAULTS)."""
    if method not in SSL_DEFAULTS:
        raise ValueError(f"no SSL defaults for method {method!r}; SSL methods: "
                         f"{', '.join(SSL_DEFAULTS)}")
    values = {}
    for key, default in SSL_DEFAULTS[method].items():
        if getattr(ssl, key) is not None:
            continue
        if default == "encoder":
            default = encoder_channels
        elif default == "2x encoder":
            default = 2 * encoder_channels
        values[key] = default
    return dataclasses.replace(ssl, **values)


@dataclass
class ProbeConfig:
    """Few-shot landmark probe during pretraining (training/probe.py): every `every` optimiser
    steps, a linear heatmap head is fitted (in closed form) on the FROZEN features of the
    current (EMA) model for `num_train` labelled images and scored on `num_val` others (MRE /
    SDR in the dataset's unit, logged as probe/*); run_dir/best/ keeps the export at the best
    probe MRE."""
    every: int = 0                      # optimiser steps; 0 = off
    dataset: str = ""                   # a dataset config (its data section); "" = this run's data
    split: str = ""                     # labelled pool; "" = data.train_split (never a test split)
    num_train: int = 10                 # labelled images the head is trained on
    num_val: int = 10                   # images it is scored on, drawn from the rest of the pool
    seed: int = 0                       # of the image draw
    sigma: float = 2.0                  # Gaussian targets, model-grid pixels
    foreground_weight: float = 5.0      # of the heatmap MSE (heatmaps/losses.py)
    ridge: float = 0.01                 # L2 penalty of the head (features are standardised)
    # Feature maps are resized to the finest one's side, at most feature_size, before the
    # head; memory ~ channels x side^2 x num_train floats (tiny at 64 px: 224 x 64^2 x 10).
    feature_size: int = 64
    batch_size: int = 16                # feature-extraction batch
    sdr_thresholds: Optional[list[float]] = None  # None = the dataset's usual radii


@dataclass
class CurriculumStage:
    """One stage of a pretraining curriculum (data/curriculum.py). A stage trains the optimiser
    steps after the previous stage's `until_step` up to and including its own."""
    name: str = ""                      # for logs and curriculum.json; "" = "stage<index>"
    until_step: Optional[int] = None    # last optimiser step (1-based); None = to train.max_steps
    # Pool name (unlabeled.pools[].name, or "<dataset>:<split>" for unlabeled.labelled_splits)
    # -> sampling weight in this stage; {} = every pool at its configured weight.
    pools: dict[str, float] = field(default_factory=dict)
    # Multiplier of the augmentation ranges (augment for ddpm, ssl.views for the SSL methods):
    # 0 = identity, 1 = as configured; probabilities are kept (curriculum.scale_augment).
    augment_strength: float = 1.0
    augment: dict[str, Any] = field(default_factory=dict)   # explicit augment.* values (ddpm)
    views: dict[str, Any] = field(default_factory=dict)     # explicit ssl.views.* values (SSL)
    image_size: Optional[int] = None    # training resolution of the stage; None = data.image_size


@dataclass
class CurriculumConfig:
    """Staged pretraining (data/curriculum.py): stages in order; empty = no curriculum."""
    stages: list[CurriculumStage] = field(default_factory=list)


@dataclass
class CropConfig:
    """Pretraining on patches, for the refinement stage's local network: each item is a
    data.image_size square crop at `grid` pixels across the image's long side (the refinement
    grid, refine.grid of the fine-tuning; the pool file's own pixels for grid = its long
    side), centred on a uniformly drawn point of the image, then the augment section's affine
    about the crop centre. 0 = off: whole images resized to data.image_size."""
    grid: int = 0


@dataclass
class PretrainConfig:
    # ddpm = diffusion pretraining of a U-Net (model, diffusion, augment sections);
    # simclr | moco_v2 | moco_v3 = contrastive pretraining of an smp encoder (ssl section).
    method: str = "ddpm"
    data: DataConfig = field(default_factory=DataConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        rotation_deg=5.0, scale=(0.95, 1.05), translate=0.03, noise_std=0.0))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
