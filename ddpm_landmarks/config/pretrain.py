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
from ddpm_landmarks.config.ranges import dotted, ranged
from ddpm_landmarks.config.training import LoggerConfig, OptimConfig, TrainConfig
from ddpm_landmarks.errors import ConfigError


@dataclass
class ModelConfig:
    preset: str = "tiny"                # tiny | small | base | paper (ddpm_landmarks.models.unet)
    # None = the preset's resolution (= data.image_size)
    sample_size: Optional[int] = ranged(None, ">= 1")
    gradient_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = ranged(1000, ">= 2")  # the paper: 500
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = ranged(1e-4, "(0, 1)")       # <= beta_end
    beta_end: float = ranged(0.02, "(0, 1)")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: Optional[float] = ranged(None, "> 0")  # None = plain MSE; 5.0 = Hang et al. 2023
    # Training timesteps are drawn uniformly from {min_timestep, ..., T - 1}; the released
    # code draws from [1, T) (torch.randint(low=1, high=T)), i.e. min_timestep 1.
    min_timestep: int = ranged(0, ">= 0")
    # The range the images are diffused in: signed = [-1, 1] (ours, DDPM's usual); unit =
    # [0, 1] (the released code diffuses its min-max images as they are). Fine-tuning feeds a
    # regressor of this export the same range (models/regressor.py, model.input_range).
    image_range: Literal["signed", "unit"] = "signed"
    sample_steps: int = ranged(25, ">= 1")           # DDIM steps for the logged sample grid
    num_samples: int = ranged(8, ">= 1")             # images in the logged grids

    def check_fields(self, prefix: str = "") -> None:
        """beta_start <= beta_end, min_timestep < num_train_timesteps (config/ranges.py:
        rules joining two fields)."""
        if self.beta_start > self.beta_end:
            raise ConfigError(f"{dotted(prefix, 'beta_start')}: {self.beta_start} is above "
                              f"beta_end {self.beta_end}; the noise schedule must increase")
        if self.min_timestep >= self.num_train_timesteps:
            raise ConfigError(f"{dotted(prefix, 'min_timestep')}: {self.min_timestep} leaves no "
                              f"timestep below num_train_timesteps {self.num_train_timesteps}")


@dataclass
class ViewConfig:
    """Two-view augmentation of the SSL baselines (data/ssl_views.py), gray x-rays only.

    Each view: a random resized crop of the model grid (area fraction `crop_scale`, aspect
    `crop_ratio`, torchvision's sampling), a rotation, an optional horizontal flip, then with
    probability `jitter_prob` gamma / contrast / brightness (SimCLR's colour jitter without
    hue and saturation), a Gaussian blur with probability `blur_prob`, and Gaussian noise.
    Defaults are ours for x-rays: the papers crop from 8-20 % of an ImageNet image and flip.
    """
    crop_scale: tuple[float, float] = ranged((0.3, 1.0), "(0, 1]", ordered=True)
    crop_ratio: tuple[float, float] = ranged((0.75, 1.3333333333333333), "> 0", ordered=True)
    rotation_deg: float = ranged(10.0, "[0, 180]")
    flip_prob: float = ranged(0.0, "[0, 1]")     # anatomy has a side: off unless asked for
    jitter_prob: float = ranged(0.8, "[0, 1]")   # SimCLR / MoCo v2 apply colour jitter with p = 0.8
    brightness: float = ranged(0.2, "[0, 1]")    # additive, uniform in [-b, b] (image in [0, 1])
    contrast: float = ranged(0.2, "[0, 1]")      # around the mean, factor uniform in [1 - c, 1 + c]
    gamma: tuple[float, float] = ranged((0.7, 1.4), "> 0", ordered=True)
    # SimCLR / MoCo v2: p = 0.5, sigma 0.1-2.0 px at 224 px
    blur_prob: float = ranged(0.5, "[0, 1]")
    # in pixels of the model grid
    blur_sigma: tuple[float, float] = ranged((0.1, 2.0), ">= 0", ordered=True)
    noise_std: float = ranged(0.01, ">= 0")      # additive Gaussian noise (image in [0, 1])
    # DINO's multi-crop: the two views above at global_size (None = data.image_size; the
    # released code: 224 from a 256 image), plus local_crops small crops of local_size pixels
    # from local_crop_scale of the image (DINO: 0.05-0.4; the released code: 6 at 96 px,
    # 0.05-1). Other methods take local_crops = 0 only.
    global_size: Optional[int] = ranged(None, ">= 8")
    local_crops: int = ranged(0, ">= 0")
    local_size: int = ranged(96, ">= 8")
    local_crop_scale: tuple[float, float] = ranged((0.05, 0.4), "(0, 1]", ordered=True)


@dataclass
class SSLConfig:
    """SSL baselines (methods/simclr.py, simclr_v2.py, moco_v2.py, moco_v3.py, dino.py) on smp
    encoders.

    Fields left at None take the method's default (SSL_DEFAULTS), filled in by
    resolve_ssl_config before the run's config.yaml is written, so the run records the values.
    """
    encoder: str = "resnet18"           # segmentation_models_pytorch encoder name
    in_channels: int = ranged(1, "{1, 3}")   # 1 = gray x-ray; 3 = the gray image repeated
    # projection output (SimCLR / MoCo v2 128, MoCo v3 256)
    proj_dim: Optional[int] = ranged(None, ">= 1")
    hidden_dim: Optional[int] = ranged(None, ">= 1")  # MLP hidden width; None: see SSL_DEFAULTS
    # projection MLP depth: 2 (SimCLR, MoCo), 3 (SimCLR v2, DINO)
    proj_layers: Optional[int] = ranged(None, ">= 1")
    temperature: Optional[float] = ranged(None, "> 0")             # DINO: the student's
    teacher_temperature: Optional[float] = ranged(None, "> 0")     # DINO: 0.04 (released: 0.5)
    center_momentum: Optional[float] = ranged(None, "[0, 1]")      # DINO: 0.9 (released: 0.5)
    bottleneck_dim: int = ranged(256, ">= 1")    # DINO head: hidden -> bottleneck -> L2 -> out
    # MoCo v2 queue (the paper: 65536 of 1.28 M images). A multiple of the global batch, and
    # queue + global batch <= the number of images, else an image's own older key is among its
    # negatives (warned at the start of a run).
    queue_size: int = ranged(1024, ">= 1")
    # MoCo v2 0.999; MoCo v3 0.99, DINO 0.996 (cosine start)
    momentum: Optional[float] = ranged(None, "[0, 1]")
    momentum_end: float = ranged(1.0, "[0, 1]")  # MoCo v3, DINO: momentum at the last step
    sync_bn: bool = True                # SimCLR, MoCo v3: SyncBatchNorm across GPU processes
    shuffle_bn: bool = True             # MoCo v2: shuffle keys across processes (shuffling BN)
    views: ViewConfig = field(default_factory=ViewConfig)


# None-valued SSLConfig fields per method. hidden_dim "encoder" = the encoder's output channels
# (SimCLR and MoCo v2: 2048 = ResNet-50's), "2x encoder" = twice that (MoCo v3: 4096 for
# ResNet-50's 2048). Published values and our small-batch choices: see each method's docstring.
SSL_DEFAULTS: dict[str, dict] = {
    "simclr": {"temperature": 0.5, "proj_dim": 128, "hidden_dim": "encoder", "proj_layers": 2},
    "simclr_v2": {"temperature": 0.5, "proj_dim": 128, "hidden_dim": "encoder",
                  "proj_layers": 3},
    "moco_v2": {"temperature": 0.2, "proj_dim": 128, "hidden_dim": "encoder", "momentum": 0.999,
                "proj_layers": 2},
    "moco_v3": {"temperature": 1.0, "proj_dim": 256, "hidden_dim": "2x encoder",
                "momentum": 0.99, "proj_layers": 2},
    "dino": {"temperature": 0.1, "teacher_temperature": 0.04, "center_momentum": 0.9,
             "proj_dim": 65536, "hidden_dim": 2048, "momentum": 0.996, "proj_layers": 3},
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
    every: int = ranged(0, ">= 0")      # optimiser steps; 0 = off
    dataset: str = ""                   # a dataset config (its data section); "" = this run's data
    split: str = ""                     # labelled pool; "" = data.train_split (never a test split)
    num_train: int = ranged(10, ">= 1")  # labelled images the head is trained on
    num_val: int = ranged(10, ">= 1")   # images it is scored on, drawn from the rest of the pool
    seed: int = ranged(0, ">= 0")       # of the image draw
    sigma: float = ranged(2.0, "> 0")   # Gaussian targets, model-grid pixels
    foreground_weight: float = ranged(5.0, "> 0")  # of the heatmap MSE (heatmaps/losses.py)
    ridge: float = ranged(0.01, "> 0")  # L2 penalty of the head (features are standardised)
    # Feature maps are resized to the finest one's side, at most feature_size, before the
    # head; memory ~ channels x side^2 x num_train floats (tiny at 64 px: 224 x 64^2 x 10).
    feature_size: int = ranged(64, ">= 1")
    batch_size: int = ranged(16, ">= 1")  # feature-extraction batch
    sdr_thresholds: Optional[list[float]] = ranged(None, "> 0")  # None = the dataset's usual radii


@dataclass
class CurriculumStage:
    """One stage of a pretraining curriculum (data/curriculum.py). A stage trains the optimiser
    steps after the previous stage's `until_step` up to and including its own."""
    name: str = ""                      # for logs and curriculum.json; "" = "stage<index>"
    # last optimiser step (1-based); None = to train.max_steps
    until_step: Optional[int] = ranged(None, ">= 1")
    # Pool name (unlabeled.pools[].name, or "<dataset>:<split>" for unlabeled.labelled_splits)
    # -> sampling weight in this stage; {} = every pool at its configured weight.
    pools: dict[str, float] = ranged({}, "> 0")
    # Multiplier of the augmentation ranges (augment for ddpm, ssl.views for the SSL methods):
    # 0 = identity, 1 = as configured; probabilities are kept (curriculum.scale_augment).
    augment_strength: float = ranged(1.0, ">= 0")
    augment: dict[str, Any] = field(default_factory=dict)   # explicit augment.* values (ddpm)
    views: dict[str, Any] = field(default_factory=dict)     # explicit ssl.views.* values (SSL)
    # training resolution of the stage; None = data.image_size
    image_size: Optional[int] = ranged(None, ">= 1")


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
    grid: int = ranged(0, ">= 0")


@dataclass
class PretrainConfig:
    # ddpm = diffusion pretraining of a U-Net (model, diffusion, augment sections);
    # simclr | simclr_v2 | moco_v2 | moco_v3 | dino = self-supervised pretraining of an smp
    # encoder (ssl section).
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

    def check_fields(self, prefix: str = "") -> None:
        """Never pretrain on the split results are reported on (config/ranges.py: rules
        joining two fields; exclusions of other datasets' test splits: unlabeled.exclude)."""
        if self.data.eval_split in self.unlabeled.labelled_splits:
            raise ConfigError(f"{dotted(prefix, 'unlabeled.labelled_splits')}: "
                              f"{self.unlabeled.labelled_splits} includes data.eval_split "
                              f"{self.data.eval_split!r}, the split results are reported on; "
                              f"never pretrain on it")
