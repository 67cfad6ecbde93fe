"""Config of a fine-tuning run: the shared data sections plus the regressor (model), loss,
optimiser, engine and logger sections.

    cfg = load_config("configs/finetune/isbi2015.yaml", ["fewshot.budget=10"], cls=FinetuneConfig)
"""
from __future__ import annotations

import dataclasses
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
    UncertaintyConfig,
)
from ddpm_landmarks.config.ranges import dotted, ranged
from ddpm_landmarks.config.training import LoggerConfig, OptimConfig, TrainConfig
from ddpm_landmarks.errors import ConfigError

SMP_SIZE_MULTIPLE = 32                  # smp encoders: five stride-2 stages


@dataclass
class ReleasedUnetConfig:
    """The released code's U-Net (models/released_unet.py) as its checkpoints were trained:
    Unet(dim=256, dim_mults=(1, 2, 4, 8), self_condition=True, resnet_block_groups=4,
    att_heads=4, att_res=32). Other values are for tests and CPU runs only."""
    dim: int = ranged(256, ">= 8")      # base width (the released code ties it to the image size)
    dim_mults: tuple[int, ...] = ranged((1, 2, 4, 8), ">= 1")
    channels: int = ranged(1, ">= 1")
    self_condition: bool = True         # a zero channel next to the image, as released
    resnet_block_groups: int = ranged(4, ">= 1")  # GroupNorm groups (the released config's "res_blocks")
    att_heads: int = ranged(4, ">= 1")
    att_dim_head: int = ranged(32, ">= 1")  # width of a head (the released config's "attn_res")
    gradient_checkpointing: bool = False  # released: on; recomputes activations (memory only)


@dataclass
class RegressorConfig:
    # ddpm_unet: the DDPM U-Net of this module; smp_unet / smp_unetplusplus: smp baselines;
    # released_unet: the released code's U-Net (models/released_unet.py, section `released`)
    arch: Literal["ddpm_unet", "smp_unet", "smp_unetplusplus", "released_unet"] = "ddpm_unet"
    # pretrained: pretrained_path (DDPM export, or an SSL encoder export for smp archs);
    # scratch: random init; imagenet: smp archs only (imagenet_weights, else smp's download);
    # regressor: the body of a landmark regressor of another dataset (models/transfer_init.py);
    # released_ddpm: the authors' DDPM checkpoint file (arch released_unet); released_ssl: the
    # authors' SSL backbone file (smp archs, densenet161); models/released_weights.py
    init: Literal["pretrained", "scratch", "imagenet", "regressor", "released_ddpm",
                  "released_ssl"] = "pretrained"
    # a pretraining run's export/ folder, or for init=regressor a fine-tuning run's best/ or
    # export/ ("" = none: scratch only)
    pretrained_path: str = ""
    preset: str = "tiny"                # scratch without pretrained_path: ddpm_landmarks.models.unet
    timestep_mode: Literal["fixed", "drop"] = "fixed"
    timestep: int = ranged(0, ">= 0")   # < the pretraining's diffusion.num_train_timesteps
    noise_input: bool = False           # needs the exported scheduler (pretrained_path/scheduler)
    freeze: Literal["none", "encoder", "unet"] = "none"
    head: Literal["conv1x1", "small"] = "conv1x1"
    # DDPM U-Nets: the range the network sees ([-1, 1] images mapped inside the model):
    # signed = [-1, 1]; unit = [0, 1]; auto = the pretraining's diffusion.image_range (the
    # export's config; the released U-Net: unit), signed without one. Resolved when built.
    input_range: Literal["auto", "signed", "unit"] = "auto"
    released: ReleasedUnetConfig = field(default_factory=ReleasedUnetConfig)  # arch released_unet
    # smp archs only (models/smp_regressor.py):
    encoder: str = "resnet18"           # smp encoder name (resnet50, densenet161, vgg19, tu-...)
    imagenet_weights: str = ""          # init=imagenet offline: encoder state-dict file / folder
    gray_adapter: Literal["repeat", "in_channels", "colorize"] = "repeat"
    # encoder input normalisation; unit = the [0, 1] image without mean / std (the released
    # code's ImageNet and SSL baselines)
    input_norm: Literal["auto", "imagenet", "none", "unit"] = "auto"
    # ddpm_unet only, set by refinement runs with refine.landmark_input=embedding: the number
    # of landmark classes embedded into the time embedding (one output channel, the landmark
    # index an input); 0 = none (one output channel per landmark).
    landmark_embedding: int = ranged(0, ">= 0")


# Fields of RegressorConfig that change the body's parameters, per source arch.
BODY_FIELDS = {"ddpm_unet": ("arch", "timestep_mode"),
               "released_unet": ("arch", "timestep_mode"),     # + `released`: the source's
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
    # mse: weight of pixels with target > foreground_threshold
    foreground_weight: float = ranged(1.0, "> 0")
    foreground_threshold: float = ranged(0.1, "[0, 1)")
    pos_weight: Optional[float] = ranged(None, "> 0")   # bce: weight of the positive term
    # softmax_ce / channel_ce: target > threshold = the class
    softmax_threshold: float = ranged(0.5, "[0, 1)")

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
    lr: float = ranged(1e-4, "> 0")
    head_lr: Optional[float] = ranged(1e-3, "> 0")
    weight_decay: float = ranged(1e-4, ">= 0")
    warmup_steps: int = ranged(50, ">= 0")
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    plateau_factor: float = ranged(0.5, "(0, 1)")
    plateau_patience: int = ranged(3, ">= 1")


@dataclass
class EpochsConfig:
    """Fine-tuning counted in epochs of the labelled images, as the released code counts it (at
    most 200 epochs; validation, the plateau schedule and early stopping once per epoch).
    The engine counts optimiser steps: resolve_epochs turns these into train.max_steps and
    train.eval_every for the run's number of images before training (config.yaml records
    both). Plateau and early-stopping patience count validations, i.e. epochs here."""
    max: Optional[int] = ranged(None, ">= 1")  # None: train.max_steps / train.eval_every as given
    eval_every: int = ranged(1, ">= 1")  # validate every this many epochs


def steps_per_epoch(num_images: int, batch_size: int, grad_accum: int,
                    num_processes: int = 1) -> int:
    """Optimiser steps in one epoch of `num_images` labelled images, as the engine runs it:
    the images repeated to fill one batch per process (launch.repeated_to_fill), whole batches
    only (drop_last), each process its share of them, and a step every grad_accum batches plus
    one at the epoch's end for a remainder (accelerate syncs at the end of the loader).
    The released code (batch 2, accumulation 8, drop_last=False) makes ceil(ceil(N / 2) / 8)
    steps: the same for N = 1, 5, 10, 25, 50, 130, 195, 550 (tests/config)."""
    if min(num_images, batch_size, grad_accum, num_processes) < 1:
        raise ValueError(f"steps_per_epoch needs positive counts, got images={num_images}, "
                         f"batch={batch_size}, accumulation={grad_accum}, "
                         f"processes={num_processes}")
    global_batch = batch_size * num_processes
    repeats = max(1, -(-global_batch // num_images))         # ceil
    batches = (num_images * repeats // batch_size) // num_processes
    return -(-batches // grad_accum)


def resolve_epochs(cfg: "FinetuneConfig", num_images: int, num_processes: int = 1
                   ) -> "FinetuneConfig":
    """cfg with train.max_steps = epochs.max x steps_per_epoch and train.eval_every =
    epochs.eval_every x steps_per_epoch for `num_images` training images; cfg itself when
    epochs.max is None. ValueError for a non-positive epoch count."""
    epochs = cfg.epochs
    if epochs.max is None:
        return cfg
    if epochs.max < 1 or epochs.eval_every < 1:
        raise ValueError(f"epochs.max={epochs.max} and epochs.eval_every={epochs.eval_every} "
                         f"must be >= 1")
    per_epoch = steps_per_epoch(num_images, cfg.train.batch_size, cfg.train.grad_accum,
                                num_processes)
    train = dataclasses.replace(cfg.train, max_steps=epochs.max * per_epoch,
                                eval_every=epochs.eval_every * per_epoch)
    return dataclasses.replace(cfg, train=train)


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
    patch_size: int = ranged(64, ">= 8")  # patch side in pixels
    # Patch pixels across the long side of the image: one patch pixel = long side / grid
    # original pixels, isotropic (512 = the stored ISBI images, 0.469 mm; 256 = 0.94 mm).
    grid: int = ranged(512, ">= 8")
    # Patch-centre jitter in training: N(0, s^2) per axis around the ground truth, s in the
    # dataset's unit (mm or px); None = each landmark's RMS error of stage 1 on the
    # validation images (held-out training images) per axis, times jitter_scale.
    jitter: Optional[float] = ranged(None, ">= 0")
    jitter_scale: float = ranged(1.0, ">= 0")
    # Which landmark a patch is for: channels = K output channels, the patch's read (and
    # supervised); embedding = the landmark index as an input (a learned embedding added to the
    # DDPM U-Net's time embedding, zero at the start) and one output channel.
    landmark_input: Literal["channels", "embedding"] = "channels"
    # Supervised channels of a patch (channels mode): own = only the landmark the patch is cut
    # for; visible = every landmark inside the patch (the others are masked out of the loss).
    supervise: Literal["own", "visible"] = "own"
    iterations: int = ranged(1, ">= 1")  # re-centre on the refined point and refine again
    # Inference cost: landmarks of one image within share_radius patch pixels of a common
    # centre share one patch (one forward; each reads its own channel). Needs
    # supervise=visible, so that a channel knows its landmark anywhere on a patch (training
    # then also moves each patch centre within share_radius); at most (patch_size - 1) / 2.
    # Use it with prior_weight > 0: the stage-1 heatmap says which of two look-alike
    # neighbours on a shared patch is which. 0 = one patch per landmark.
    share_radius: float = ranged(0.0, ">= 0")
    # Context against look-alikes (inference): the local heatmap times the stage-1 heatmap
    # resampled onto the patch to the power prior_weight (0 = off) ...
    prior_weight: float = ranged(0.0, ">= 0")
    # ... and a displacement limit in the dataset's unit: a refined point farther than this
    # from the stage-1 point keeps the stage-1 point (None = no limit).
    max_shift: Optional[float] = ranged(None, "> 0")
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
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    model: RegressorConfig = field(default_factory=RegressorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=_finetune_train)
    # Epoch-based schedule (the released code's): resolved into train.max_steps / eval_every.
    epochs: EpochsConfig = field(default_factory=EpochsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check_fields(self, prefix: str = "") -> None:
        """Rules joining two fields (config/ranges.py): the smp U-Nets downsample five times,
        so their input side is a multiple of 32. The DDPM U-Net's rule depends on its levels
        (the export's config), checked when the model is built, before the run writes. A
        refinement run's model sees refine.patch_size patches (data.image_size is stage 1's).
        A shared patch (refine.share_radius) needs channels trained on every visible landmark
        and keeps its landmarks inside the patch."""
        key, size = ("refine.patch_size", self.refine.patch_size) if self.refine.enabled else \
            ("data.image_size", self.data.image_size)
        refine = self.refine
        if refine.enabled and refine.share_radius > 0:
            if refine.landmark_input != "channels" or refine.supervise != "visible":
                raise ConfigError(
                    f"{dotted(prefix, 'refine.share_radius')}: {refine.share_radius:g} shares "
                    f"a patch between landmarks, which needs refine.landmark_input=channels and "
                    f"refine.supervise=visible (here {refine.landmark_input} / "
                    f"{refine.supervise}): set those, or refine.share_radius=0")
            if refine.share_radius > (refine.patch_size - 1) / 2:
                raise ConfigError(
                    f"{dotted(prefix, 'refine.share_radius')}: {refine.share_radius:g} patch "
                    f"pixels would put a landmark outside its {refine.patch_size} px patch; "
                    f"at most {(refine.patch_size - 1) / 2:g}")
        if self.model.arch.startswith("smp_") and size % SMP_SIZE_MULTIPLE:
            raise ConfigError(f"{dotted(prefix, key)}: {size} is not a multiple of "
                              f"{SMP_SIZE_MULTIPLE}, which model.arch={self.model.arch} needs "
                              f"(five stride-2 stages)")
