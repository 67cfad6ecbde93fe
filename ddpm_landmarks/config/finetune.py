"""Config of a fine-tuning run: the shared data sections plus the regressor (model), loss,
optimiser, engine and logger sections.

    cfg = load_config("configs/finetune/isbi2015.yaml", ["fewshot.budget=10"], cls=FinetuneConfig)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    FewShotConfig,
    HeatmapConfig,
    RunConfig,
)
from ddpm_landmarks.config.training import LoggerConfig, OptimConfig, TrainConfig


@dataclass
class RegressorConfig:
    # ddpm_unet: the DDPM U-Net of this module; smp_unet / smp_unetplusplus: smp baselines
    arch: Literal["ddpm_unet", "smp_unet", "smp_unetplusplus"] = "ddpm_unet"
    # pretrained: pretrained_path (DDPM export, or an SSL encoder export for smp archs);
    # scratch: random init; imagenet: smp archs only (imagenet_weights, else smp's download);
    # regressor: the body of a landmark regressor of another dataset (models/transfer_init.py)
    init: Literal["pretrained", "scratch", "imagenet", "regressor"] = "pretrained"
    # a pretraining run's export/ folder, or for init=regressor a fine-tuning run's best/ or
    # export/ ("" = none: scratch only)
    pretrained_path: str = ""
    preset: str = "tiny"                # scratch without pretrained_path: ddpm_landmarks.models.unet
    timestep_mode: Literal["fixed", "drop"] = "fixed"
    timestep: int = 0
    noise_input: bool = False           # needs the exported scheduler (pretrained_path/scheduler)
    freeze: Literal["none", "encoder", "unet"] = "none"
    head: Literal["conv1x1", "small"] = "conv1x1"
    # smp archs only (models/smp_regressor.py):
    encoder: str = "resnet18"           # smp encoder name (resnet50, densenet161, vgg19, tu-...)
    imagenet_weights: str = ""          # init=imagenet offline: encoder state-dict file / folder
    gray_adapter: Literal["repeat", "in_channels", "colorize"] = "repeat"
    input_norm: Literal["auto", "imagenet", "none"] = "auto"   # encoder input normalisation
    # ddpm_unet only, set by refinement runs with refine.landmark_input=embedding: the number
    # of landmark classes embedded into the time embedding (one output channel, the landmark
    # index an input); 0 = none (one output channel per landmark).
    landmark_embedding: int = 0


# Fields of RegressorConfig that change the body's parameters, per source arch.
BODY_FIELDS = {"ddpm_unet": ("arch", "timestep_mode"),
               "smp_unet": ("arch", "encoder", "gray_adapter"),
               "smp_unetplusplus": ("arch", "encoder", "gray_adapter")}
def check_same_body(target, source, where: str) -> None:
    """ValueError when the target RegressorConfig asks for another body than the source's."""
    fields = BODY_FIELDS.get(source.arch)
    if fields is None:
        raise ValueError(f"{where}: unknown source arch {source.arch!r}")
    for name in fields:
        mine, theirs = getattr(target, name), getattr(source, name)
        if mine != theirs:
            raise ValueError(f"model.{name}={mine} conflicts with the source regressor {where} "
                             f"({name}={theirs}): with init=regressor the architecture comes "
                             f"from the source; set model.{name}={theirs}")


@dataclass
class LossConfig:
    # mse / bce / softmax_ce (spatial softmax) / channel_ce (the released code's
    # nn.CrossEntropyLoss over landmark channels); see heatmaps/losses.py.
    name: Literal["mse", "bce", "softmax_ce", "channel_ce"] = "mse"
    foreground_weight: float = 1.0      # mse: weight of pixels with target > foreground_threshold
    foreground_threshold: float = 0.1
    pos_weight: Optional[float] = None  # bce: weight of the positive term
    softmax_threshold: float = 0.5      # softmax_ce / channel_ce: target > threshold = the class

    def kwargs(self) -> dict:
        """Keyword arguments of heatmaps.losses.LOSSES[name]."""
        if self.name == "mse":
            return {"foreground_weight": self.foreground_weight,
                    "foreground_threshold": self.foreground_threshold}
        if self.name == "bce":
            return {"pos_weight": self.pos_weight}
        return {"threshold": self.softmax_threshold}


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW with per-part learning rates: `lr` for the pretrained body, `head_lr` for the new
    head (None = lr). "plateau" = warm-up, then the lr is multiplied by plateau_factor after
    plateau_patience evaluations without a better validation MRE (needs train.eval_every)."""
    lr: float = 1e-4
    head_lr: Optional[float] = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 3


@dataclass
class RefineConfig:
    """Stage 2 of a coarse-to-fine pipeline (training/refine_stage.py, inference/two_stage.py).

    A refinement run fine-tunes a local network on patches cut around each landmark at a finer
    grid, starting from a finished stage-1 fine-tuning run (`stage1`), on the same labelled
    images; its own model / loss / heatmap / optim / train sections describe the LOCAL network
    (heatmap.sigma in patch pixels). The run folder then holds both stages (stage1/ = a copy
    of the stage-1 regressor, best/ and export/ = the local network, refine.json = the per-
    landmark choices), and `evaluate` / `predict` run the two stages and report both."""
    enabled: bool = False
    stage1: str = ""                    # the stage-1 fine-tuning run folder (or its best/)
    stage1_weights: Literal["best", "export"] = "best"
    patch_size: int = 64                # patch side in pixels
    # Patch pixels across the long side of the image: one patch pixel = long side / grid
    # original pixels, isotropic (512 = the stored ISBI images, 0.469 mm; 256 = 0.94 mm).
    grid: int = 512
    # Patch-centre jitter in training: N(0, s^2) per axis around the ground truth, s in the
    # dataset's unit (mm or px); None = each landmark's RMS error of stage 1 on the
    # validation images (held-out training images) per axis, times jitter_scale.
    jitter: Optional[float] = None
    jitter_scale: float = 1.0
    # Which landmark a patch is for: channels = K output channels, the patch's read (and
    # supervised); embedding = the landmark index as an input (a learned embedding added to the
    # DDPM U-Net's time embedding, zero at the start) and one output channel.
    landmark_input: Literal["channels", "embedding"] = "channels"
    # Supervised channels of a patch (channels mode): own = only the landmark the patch is cut
    # for; visible = every landmark inside the patch (the others are masked out of the loss).
    supervise: Literal["own", "visible"] = "own"
    iterations: int = 1                 # re-centre on the refined point and refine again
    # Context against look-alikes (inference): the local heatmap times the stage-1 heatmap
    # resampled onto the patch to the power prior_weight (0 = off) ...
    prior_weight: float = 0.0
    # ... and a displacement limit in the dataset's unit: a refined point farther than this
    # from the stage-1 point keeps the stage-1 point (None = no limit).
    max_shift: Optional[float] = None
    # Per landmark: how many iterations (0 = keep stage 1, up to `iterations`), chosen on the
    # validation images at the end of training (validation), or every landmark refined `iterations`
    # times (all).
    select: Literal["validation", "all"] = "validation"


def _finetune_train() -> TrainConfig:
    # Few labelled images: short runs, EMA off by default (best-by-validation instead).
    return TrainConfig(max_steps=1000, batch_size=8, ema=False, ema_decay=0.999,
                       checkpoint_every=250, image_every=0, log_every=10, eval_every=100)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: RegressorConfig = field(default_factory=RegressorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=_finetune_train)
    refine: RefineConfig = field(default_factory=RefineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
