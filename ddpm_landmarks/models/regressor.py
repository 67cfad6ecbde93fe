"""The pretrained DDPM U-Net fine-tuned as a K-channel landmark heatmap regressor.

    cfg = RegressorConfig(init="pretrained", pretrained_path="runs/pretrain/export")
    model = build_regressor(cfg, num_landmarks=19, image_size=256)      # models.registry
    heatmaps = model(images)                  # (B, 1, H, W) in [-1, 1] -> (B, K, H, W), raw values
    opt = torch.optim.AdamW(param_groups(model, body_lr=1e-4, head_lr=1e-3, weight_decay=1e-4))
    save_regressor(model, "out/model"); model = load_regressor("out/model")  # saved_regressor

Head. `unet.conv_out` (GroupNorm-SiLU'd last decoder features -> 1 channel) is replaced by a new
head with K outputs: "conv1x1" = Conv2d(C, K, 1); "small" = Conv2d(C, C, 3) + GroupNorm + SiLU +
Conv2d(C, K, 1). The last conv of the head has weights ~ N(0, 1e-3^2) and zero bias, so initial
heatmaps are ~0 (right for MSE on Gaussian targets). Not exactly zero on purpose: a zero last
layer gives the whole body zero gradient on the first step.

Timesteps.
  "fixed": every image is fed with t = cfg.timestep (0 = the clean-image end of the chain).
  "drop":  time conditioning is removed, as in the original DDPM-landmark fine-tuning code whose
           U-Net blocks have no time projection. Exactly: `unet.time_embedding` (the time MLP) is
           replaced by a parameter-free module that returns None, so UNet2DModel.forward passes
           temb=None to every block; every ResnetBlock2D gets `time_emb_proj = None` (parameters
           removed) and `time_embedding_norm = "default"`, whose forward with temb None is plain
           conv1 -> norm2 -> SiLU -> conv2 (for "scale_shift" blocks this equals FiLM with scale =
           shift = 0). Attention blocks and up/down samplers ignore temb. The remaining
           `time_proj` (sinusoids, no parameters) still runs on a dummy t and its output is
           discarded. Output therefore does not depend on cfg.timestep (except through
           noise_input, which uses cfg.timestep as the noise level).
  noise_input: in training mode x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with fresh eps each
           forward (a = the pretraining scheduler's alphas_cumprod, stored as a buffer). In eval
           mode no noise is drawn: the input is the mean of q(x_t | x_0), sqrt(a_t) x0, so
           predictions are deterministic and independent of batch composition.

Input range (`model.input_range`): the regressor takes the pipeline's [-1, 1] images and feeds
the U-Net the range it was pretrained in: "unit" maps x -> (x + 1) / 2 (a U-Net diffused in
[0, 1], as the released code does: diffusion.image_range=unit), "signed" leaves x. "auto" is
resolved when the model is built, from the export's ddpm_landmarks_config.yaml; the resolved
value is what the saved regressor records.

Freezing: "encoder" = conv_in + time embedding + down blocks + mid block; "unet" = everything but
the new head (a linear/small probe). Frozen parameters have requires_grad False and are left out of
`param_groups`.

Architectures (`model.arch`, the ARCHS registry): "ddpm_unet" (this module, the default),
"smp_unet" / "smp_unetplusplus" (segmentation-models-pytorch encoder-decoder baselines with
ImageNet / SSL / scratch encoders: models/smp_regressor.py). Both kinds of model expose `cfg`,
`num_landmarks`, `head` (the K-channel output conv) and `head_parameters()` (what trains at
optim.head_lr), take (B, 1, H, W) images in [-1, 1] and are saved / loaded by
models/saved_regressor.py. `model.init=regressor` (any arch) starts from such a saved regressor
of another dataset: its body, a new head for this dataset's landmarks (models/transfer_init.py).
models/registry.py maps `model.arch` to its builder.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.config.pretrain import ModelConfig
from ddpm_landmarks.models.artifacts import FORMATS, ArtifactError, read_meta
from ddpm_landmarks.models.unet import build_unet, denoise, unet_fold
from ddpm_landmarks.utils.modules import unwrap

HEAD_INIT_STD = 1e-3


class _NoTimeEmbedding(nn.Module):
    """Stands in for unet.time_embedding in "drop" mode: returns None, so blocks get temb=None."""

    def forward(self, t_emb: torch.Tensor) -> None:  # noqa: ARG002
        return None


def make_head(kind: str, channels: int, num_landmarks: int, groups: int) -> nn.Module:
    last = nn.Conv2d(channels, num_landmarks, kernel_size=1)
    nn.init.normal_(last.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(last.bias)
    if kind == "conv1x1":
        return last
    if kind == "small":
        return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                             nn.GroupNorm(groups, channels), nn.SiLU(), last)
    raise ValueError(f"unknown regressor head {kind!r}; valid: conv1x1, small")


class HeatmapRegressor(nn.Module):
    """UNet2DModel body + new K-channel head in place of `unet.conv_out`; see the module doc."""

    def __init__(self, unet: UNet2DModel, cfg: RegressorConfig, num_landmarks: int,
                 alphas_cumprod: Optional[torch.Tensor] = None):
        super().__init__()
        c = unet.config
        if c.in_channels != c.out_channels:
            raise ValueError(f"the regressor needs a U-Net of grayscale images (in_channels = "
                             f"out_channels = 1, or f^2 when folded), got {c.in_channels} in, "
                             f"{c.out_channels} out")
        self.fold = unet_fold(unet)        # ValueError unless in_channels is a square
        if c.time_embedding_type != "positional" or c.class_embed_type is not None \
                or (c.num_class_embeds or 0) != cfg.landmark_embedding:
            raise ValueError("the regressor supports positional time embedding, with class "
                             "conditioning only as its landmark embedding")
        if cfg.landmark_embedding and cfg.timestep_mode == "drop":
            raise ValueError("a landmark embedding is added to the time embedding, which "
                             "timestep_mode=drop removes; use timestep_mode=fixed")
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if cfg.timestep_mode not in ("fixed", "drop"):
            raise ValueError(f"unknown timestep_mode {cfg.timestep_mode!r}; valid: fixed, drop")
        if cfg.freeze not in ("none", "encoder", "unet"):
            raise ValueError(f"unknown freeze {cfg.freeze!r}; valid: none, encoder, unet")
        if cfg.timestep < 0:
            raise ValueError(f"timestep must be >= 0, got {cfg.timestep}")
        if cfg.input_range not in ("auto", "signed", "unit"):
            raise ValueError(f"unknown input_range {cfg.input_range!r}; valid: signed, unit")
        self.cfg = cfg
        self.num_landmarks = num_landmarks

        if cfg.noise_input:
            if alphas_cumprod is None:
                raise ValueError("noise_input needs the pretraining scheduler's alphas_cumprod "
                                 "(pretrained_path/scheduler)")
            if cfg.timestep >= len(alphas_cumprod):
                raise ValueError(f"timestep {cfg.timestep} out of range: the scheduler has "
                                 f"{len(alphas_cumprod)} timesteps")
            self.register_buffer("alphas_cumprod",
                                 alphas_cumprod.detach().to(torch.float32).clone())
        else:
            self.alphas_cumprod = None

        if cfg.timestep_mode == "drop":
            unet.time_embedding = _NoTimeEmbedding()
            for m in unet.modules():
                if isinstance(m, ResnetBlock2D):
                    m.time_emb_proj = None
                    m.time_embedding_norm = "default"    # with temb None: plain norm2
                elif hasattr(m, "time_emb_proj") or type(m).__name__ == "ResnetBlockCondNorm2D":
                    raise ValueError(f"cannot drop time conditioning from {type(m).__name__}")

        old = unet.conv_out
        # A folded U-Net predicts each landmark's f x f block: f^2 channels per landmark.
        unet.conv_out = make_head(cfg.head, old.in_channels, num_landmarks * self.fold ** 2,
                                  c.norm_num_groups)
        self.unet = unet

        if cfg.freeze == "unet":
            for name, p in self.unet.named_parameters():
                p.requires_grad_(name.startswith("conv_out."))
        elif cfg.freeze == "encoder":
            for mod in (unet.conv_in, unet.time_proj, unet.time_embedding, unet.down_blocks,
                        unet.mid_block):
                if mod is not None:
                    mod.requires_grad_(False)

    @property
    def head(self) -> nn.Module:
        return self.unet.conv_out

    def head_parameters(self):
        """New parameters (optim.head_lr): the head."""
        return self.head.parameters()

    def forward(self, images: torch.Tensor,
                landmarks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (B, 1, H, W) in [-1, 1]; landmarks (B,) the landmark index of each image
        when the model has a landmark embedding (refinement patches), else None."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        if (landmarks is None) != (self.cfg.landmark_embedding == 0):
            raise ValueError("landmarks (B,) are needed exactly when the model has a landmark "
                             f"embedding (model.landmark_embedding={self.cfg.landmark_embedding})")
        b = images.shape[0]
        t = torch.full((b,), self.cfg.timestep, dtype=torch.long, device=images.device)
        x = (images + 1) * 0.5 if self.cfg.input_range == "unit" else images
        if self.alphas_cumprod is not None:
            a = self.alphas_cumprod[self.cfg.timestep].to(torch.float32)
            x = a.sqrt() * x.float()
            if self.training:
                x = x + (1 - a).sqrt() * torch.randn_like(x)
            x = x.to(images.dtype)
        return denoise(self.unet, x, t, class_labels=landmarks)


def param_groups(model: nn.Module, body_lr: float, head_lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: body / head (the model's head_parameters(): the new parameters), each split
    into decayed (ndim > 1) and not decayed (biases, norms); frozen parameters left out, empty
    groups dropped. Each group has a "name"."""
    model = unwrap(model)
    new = model.head_parameters()          # every regressor and classifier has it
    head_ids = {id(p) for p in new}
    groups: dict[str, dict[str, Any]] = {
        "body": {"params": [], "lr": body_lr, "weight_decay": weight_decay},
        "body_no_decay": {"params": [], "lr": body_lr, "weight_decay": 0.0},
        "head": {"params": [], "lr": head_lr, "weight_decay": weight_decay},
        "head_no_decay": {"params": [], "lr": head_lr, "weight_decay": 0.0},
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        name = ("head" if id(p) in head_ids else "body") + ("" if p.ndim > 1 else "_no_decay")
        groups[name]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def _check_scratch_architecture(path: Path, preset: str) -> None:
    """init=scratch reads no weights: pretrained_path only names a DDPM export whose
    architecture to copy (the fair scratch baseline of that pretraining). Anything else there
    is an error that says how to build the preset instead."""
    try:
        read_meta(path, "ddpm_unet", "model.pretrained_path")
    except ArtifactError as err:
        raise ArtifactError(
            f"init=scratch copies the architecture of model.pretrained_path when it is a DDPM "
            f"export, but {err}. For a scratch model of model.preset={preset!r} set "
            f"model.pretrained_path='' (no weights are read for init=scratch), or pretrain first "
            f"to copy that run's architecture") from None


def export_image_range(path: Optional[Path]) -> str:
    """diffusion.image_range of the pretraining that wrote a DDPM export (its saved config);
    "signed" (the default) without an export or a recorded value."""
    config_file = path / FORMATS["ddpm_unet"].config_file if path is not None else None
    if config_file is None or not config_file.is_file():
        return "signed"
    config = yaml.safe_load(config_file.read_text()) or {}
    return str((config.get("diffusion") or {}).get("image_range", "signed"))


def _levels_factor(unet_config: Any) -> int:
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def check_unet_size(unet: UNet2DModel, image_size: int) -> None:
    """ValueError unless image_size fits the U-Net's levels; a warning when it differs from the
    size the U-Net was pretrained at (fully convolutional: allowed)."""
    fold = unet_fold(unet)
    factor = _levels_factor(unet.config) * fold
    if image_size <= 0 or image_size % factor:
        raise ValueError(f"image_size {image_size} must be a positive multiple of {factor} for "
                         f"this U-Net ({_levels_factor(unet.config).bit_length()} levels"
                         f"{f', {fold} x {fold}-folded' if fold > 1 else ''})")
    pretrained = unet.config.sample_size * fold
    if pretrained != image_size:
        warnings.warn(f"the U-Net was pretrained at {pretrained} px and is fine-tuned "
                      f"at {image_size} px (fully convolutional: allowed)", stacklevel=3)


def add_landmark_embedding(unet: UNet2DModel, num_landmarks: int) -> None:
    """A learned embedding of the landmark index added to the time embedding (diffusers' class
    conditioning, num_class_embeds in the saved config), zero-initialised: the pretrained
    network's function is unchanged at the start."""
    width = unet.time_embedding.linear_2.out_features
    unet.class_embedding = nn.Embedding(num_landmarks, width)
    nn.init.zeros_(unet.class_embedding.weight)
    unet.register_to_config(num_class_embeds=num_landmarks)


def build_ddpm_regressor(cfg: RegressorConfig, num_landmarks: int,
                         image_size: int) -> HeatmapRegressor:
    """Pretrained: the exported U-Net; scratch: the same architecture (pretrained_path's
    config.json, else cfg.preset) at random init. Warns when the exported sample_size differs
    from image_size (the U-Net is fully convolutional)."""
    if cfg.init == "imagenet":
        raise ValueError("init='imagenet' needs an smp encoder: model.arch=smp_unet or "
                         "smp_unetplusplus (the DDPM U-Net has no ImageNet weights)")
    if cfg.init in ("released_ddpm", "released_ssl"):
        raise ValueError(f"init='{cfg.init}' needs model.arch=" + (
            "released_unet (the released checkpoints hold that U-Net, not a UNet2DModel)"
            if cfg.init == "released_ddpm" else "smp_unet with model.encoder=densenet161"))
    path = Path(cfg.pretrained_path) if cfg.pretrained_path else None
    if cfg.init == "pretrained":
        if path is None:
            raise ValueError("init='pretrained' needs pretrained_path (a pretraining export/)")
        read_meta(path, "ddpm_unet", "model.pretrained_path")
        unet = UNet2DModel.from_pretrained(path)
    elif cfg.init == "scratch":
        if path is not None:
            _check_scratch_architecture(path, cfg.preset)
            unet = UNet2DModel.from_config(dict(UNet2DModel.load_config(path)))
            unet.register_to_config(sample_size=image_size // unet_fold(unet))
        else:
            unet = build_unet(ModelConfig(preset=cfg.preset), image_size=image_size)
    else:
        raise ValueError(f"unknown init {cfg.init!r}; valid: pretrained, scratch, regressor")

    check_unet_size(unet, image_size)
    if cfg.input_range == "auto":
        cfg = dataclasses.replace(cfg, input_range=export_image_range(path))
    if cfg.landmark_embedding:
        add_landmark_embedding(unet, cfg.landmark_embedding)

    alphas = None
    if cfg.noise_input:
        sched_dir = path / "scheduler" if path is not None else None
        if sched_dir is None or not (sched_dir / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"noise_input needs the pretraining scheduler at "
                                    f"{sched_dir} (pretrained_path/scheduler)")
        alphas = DDPMScheduler.from_pretrained(sched_dir).alphas_cumprod
    return HeatmapRegressor(unet, cfg, num_landmarks, alphas)
