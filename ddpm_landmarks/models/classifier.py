"""Image-level classifier on any encoder of the harness: encoder -> global average pool -> head.

    cfg = ClassifierConfig(arch="ddpm_unet", init="pretrained", pretrained_path="runs/pre/export")
    model = build_classifier(cfg, num_classes=2, image_size=64)
    logits = model(images)              # (B, 1, H, W) in [-1, 1] -> (B, num_classes)
    save_classifier(model, "out", classes=["mild", "severe"]); model, classes = load_classifier("out")

Encoders (`model.arch` x `model.init`); every one is built by the fine-tuning code's own loaders
(models/regressor.py, models/smp_regressor.py, models/encoder_weights.py), so the same files
load under the same strict rules, and then cut down to its encoder:
  ddpm_unet + pretrained  a DDPM export/ (UNet2DModel): conv_in, the down blocks and the mid
                          block; time conditioning as in fine-tuning (`timestep_mode`: "fixed"
                          feeds t = `timestep`, default 0 = the clean-image end of the chain;
                          "drop" removes the time MLP and every block's time projection). The
                          decoder (up blocks, conv_out) is dropped: its features at t = 0
                          encode the noise estimate, not the image class.
  ddpm_unet + scratch     the same encoder at random init (`preset`, or pretrained_path's
                          config.json).
  smp + pretrained        an SSL export/ (SimCLR / MoCo: encoder.safetensors + encoder.json),
                          loaded strictly, encoder name and channels checked (load_ssl_export).
  smp + imagenet          ImageNet weights of `encoder` (smp's download, or offline the local
                          file / folder `imagenet_weights`).
  smp + scratch           the smp encoder at random init.
  <either> + regressor    a FINE-TUNED landmark regressor (a fine-tuning run folder, its best/
                          or export/; models.saved_regressor.load_regressor): its encoder half, its
                          gray adapter / time mode. `model.arch` must match the regressor's.
The smp encoders see gray images through `gray_adapter` (repeat / in_channels / colorize) and
`input_norm` exactly as in fine-tuning (SmpRegressor.encoder_input).

Head (`model.head`): "linear" = [Dropout] + Linear(C, K); "mlp" = Linear(C, hidden) + ReLU +
Dropout + Linear(hidden, K). Its input is the global average pool of the encoder's deepest map
(the DDPM mid block, the smp encoder's stride-32 stage), standardised by a BatchNorm1d without
affine parameters when `feature_norm` (the linear-probe practice of MAE, He et al. 2022: frozen
features of different encoders have very different scales, and a probe should not be decided by
them). The last linear layer starts at N(0, 1e-3^2) weights and zero bias, so the initial
prediction is uniform (loss log K) while the body still gets a gradient on step one.

Freezing (`model.freeze`): "encoder" = every pretrained parameter (with `head=linear`, a linear
probe), kept in eval mode so BatchNorm statistics stay frozen too; "none" = full fine-tuning.
Learning rates (models.regressor.param_groups): the encoder at optim.lr, the head (and a
colouriser, which is new) at optim.head_lr.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_landmarks.config.classify import ClassifierConfig
from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.models.artifacts import (
    FORMATS,
    read_meta,
    weights_folder,
    write_meta,
)
from ddpm_landmarks.models.regressor import HeatmapRegressor, build_ddpm_regressor
from ddpm_landmarks.models.saved_regressor import load_regressor
from ddpm_landmarks.models.smp_regressor import SmpRegressor, build_smp_regressor
from ddpm_landmarks.utils.atomic import atomic_directory
from ddpm_landmarks.utils.modules import unwrap

FORMAT = FORMATS["classifier"]
HEAD_INIT_STD = 1e-3


# ---------------------------------------------------------------------- encoders
class DDPMEncoder(nn.Module):
    """The encoder half of a (fine-tuning-prepared) UNet2DModel: time embedding, conv_in, down
    blocks, mid block; the forward is UNet2DModel.forward's steps 1-4 (diffusers 0.3x-0.4x)."""

    def __init__(self, regressor: nn.Module):
        super().__init__()
        unet = regressor.unet
        self.conv_in, self.time_proj = unet.conv_in, unet.time_proj
        self.time_embedding = unet.time_embedding        # _NoTimeEmbedding in "drop" mode
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.timestep = int(regressor.cfg.timestep)
        self.timestep_mode = regressor.cfg.timestep_mode
        self.unet_config = {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in dict(unet.config).items() if not k.startswith("_")}
        self.out_channels = int(unet.config.block_out_channels[-1])

    def new_parameters(self):
        return iter(())

    def frozen_part(self) -> nn.Module:
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        dtype = self.conv_in.weight.dtype
        t = torch.full((images.shape[0],), self.timestep, dtype=torch.long, device=images.device)
        emb = self.time_embedding(self.time_proj(t).to(dtype))         # None when dropped
        skip = images
        x = self.conv_in(images)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                x, _, skip = block(hidden_states=x, temb=emb, skip_sample=skip)
            else:
                x, _ = block(hidden_states=x, temb=emb)
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        return x


class SmpEncoder(nn.Module):
    """An SmpRegressor cut down to its encoder (decoder and segmentation head removed): its
    gray adapter, input normalisation and encoder are the fine-tuning ones."""

    def __init__(self, regressor: nn.Module):
        super().__init__()
        regressor.net.decoder = None
        regressor.net.segmentation_head = None
        regressor.cfg = dataclasses.replace(regressor.cfg, freeze="none")  # freezing is ours
        regressor.requires_grad_(True)
        self.regressor = regressor
        self.out_channels = int(regressor.encoder.out_channels[-1])

    def new_parameters(self):
        if self.regressor.colorizer is not None:
            yield from self.regressor.colorizer.parameters()

    def frozen_part(self) -> nn.Module:
        return self.regressor.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.regressor.encoder(self.regressor.encoder_input(images))[-1]


def _regressor_cfg(cfg: ClassifierConfig, arch: str):
    return RegressorConfig(arch=arch, init=cfg.init, pretrained_path=cfg.pretrained_path,
                           preset=cfg.preset, timestep_mode=cfg.timestep_mode,
                           timestep=cfg.timestep, encoder=cfg.encoder,
                           imagenet_weights=cfg.imagenet_weights, gray_adapter=cfg.gray_adapter,
                           input_norm=cfg.input_norm)


def _from_finetuned(cfg: ClassifierConfig) -> nn.Module:
    if not cfg.pretrained_path:
        raise ValueError("init='regressor' needs pretrained_path (a fine-tuning run folder, "
                         "or its best/ or export/)")
    folder = weights_folder(cfg.pretrained_path, "regressor", "best", "model.pretrained_path")
    regressor = load_regressor(folder)
    kind = "ddpm_unet" if isinstance(regressor, HeatmapRegressor) else "smp"
    if kind != cfg.arch:
        raise ValueError(f"{folder} is a fine-tuned {regressor.cfg.arch} regressor: set "
                         f"model.arch={kind}")
    if kind == "ddpm_unet":
        if (cfg.timestep_mode, cfg.timestep) != (regressor.cfg.timestep_mode,
                                                 regressor.cfg.timestep):
            raise ValueError(f"{folder} was fine-tuned with timestep_mode="
                             f"{regressor.cfg.timestep_mode} timestep={regressor.cfg.timestep}; "
                             f"set model.timestep_mode / model.timestep to match")
        return DDPMEncoder(regressor)
    for key in ("encoder", "gray_adapter"):
        if getattr(cfg, key) != getattr(regressor.cfg, key):
            raise ValueError(f"{folder} has {key}={getattr(regressor.cfg, key)!r}; set "
                             f"model.{key}={getattr(regressor.cfg, key)}")
    return SmpEncoder(regressor)


def build_encoder(cfg: ClassifierConfig, image_size: int) -> nn.Module:
    """The encoder of cfg.arch at cfg.init (module doc); ValueError / FileNotFoundError with the
    offending file named."""
    if cfg.init == "regressor":
        return _from_finetuned(cfg)
    if cfg.arch == "ddpm_unet":
        return DDPMEncoder(build_ddpm_regressor(_regressor_cfg(cfg, "ddpm_unet"), 1, image_size))
    if cfg.arch == "smp":
        return SmpEncoder(build_smp_regressor(_regressor_cfg(cfg, "smp_unet"), 1, image_size))
    raise ValueError(f"unknown classifier arch {cfg.arch!r}; valid: ddpm_unet, smp")


# ---------------------------------------------------------------------- classifier
def _make_head(cfg: ClassifierConfig, channels: int, num_classes: int) -> nn.Sequential:
    if cfg.head == "linear":
        layers = [nn.Dropout(cfg.dropout), nn.Linear(channels, num_classes)]
    elif cfg.head == "mlp":
        if cfg.hidden_dim < 1:
            raise ValueError(f"model.hidden_dim must be >= 1, got {cfg.hidden_dim}")
        layers = [nn.Linear(channels, cfg.hidden_dim), nn.ReLU(inplace=True),
                  nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, num_classes)]
    else:
        raise ValueError(f"unknown classifier head {cfg.head!r}; valid: linear, mlp")
    nn.init.normal_(layers[-1].weight, std=HEAD_INIT_STD)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class ImageClassifier(nn.Module):
    def __init__(self, body: nn.Module, cfg: ClassifierConfig, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got {num_classes}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.freeze not in ("none", "encoder"):
            raise ValueError(f"unknown freeze {cfg.freeze!r}; valid: none, encoder")
        self.cfg, self.num_classes, self.body = cfg, num_classes, body
        channels = body.out_channels
        self.feature_norm = nn.BatchNorm1d(channels, affine=False) if cfg.feature_norm else None
        self.head = _make_head(cfg, channels, num_classes)
        if cfg.freeze == "encoder":
            body.frozen_part().requires_grad_(False)

    def head_parameters(self):
        """New parameters (optim.head_lr): the head and a colouriser."""
        yield from self.head.parameters()
        yield from self.body.new_parameters()

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if self.cfg.freeze == "encoder":
            self.body.frozen_part().eval()          # frozen BatchNorm statistics stay frozen
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) global average pool of the encoder's deepest map, in float32."""
        return self.body(images).float().mean(dim=(-2, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        if self.feature_norm is not None:
            x = self.feature_norm(x)
        return self.head(x)


def build_classifier(cfg: ClassifierConfig, num_classes: int, image_size: int) -> ImageClassifier:
    return ImageClassifier(build_encoder(cfg, image_size), cfg, num_classes)


# ---------------------------------------------------------------------- save / load
def save_classifier(model: nn.Module, out_dir: str | Path, classes: Sequence[str],
                    config: Optional[dict] = None) -> None:
    """out_dir/{classifier.safetensors, classifier.json[, config.yaml]}, atomically. The json
    holds the classes (index order of the logits) and what rebuilds the architecture without
    the pretrained files."""
    model = unwrap(model)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for {model.num_classes} outputs")
    body = model.body
    if isinstance(body, DDPMEncoder):
        arch = {"kind": "ddpm_unet", "unet_config": body.unet_config,
                "timestep_mode": body.timestep_mode, "timestep": body.timestep}
    else:
        arch = {"kind": "smp", "regressor": dataclasses.asdict(body.regressor.cfg)}
    meta = {"classifier": dataclasses.asdict(model.cfg),
            "classes": [str(c) for c in classes], "encoder": arch}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / FORMAT.weights_file), metadata={"format": FORMAT.format})
        write_meta(tmp, "classifier", meta)
        if config is not None:
            (tmp / FORMAT.config_file).write_text(yaml.safe_dump(config, sort_keys=False))


def load_classifier(out_dir: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[ImageClassifier, list[str]]:
    """(model, classes) of a folder written by save_classifier; loaded strictly."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir, "classifier", "saved classifier")
    names = {f.name for f in dataclasses.fields(ClassifierConfig)}
    cfg = ClassifierConfig(**{k: v for k, v in meta["classifier"].items() if k in names})
    arch = meta["encoder"]
    if arch["kind"] == "ddpm_unet":
        reg_cfg = RegressorConfig(timestep_mode=arch["timestep_mode"], timestep=arch["timestep"])
        body = DDPMEncoder(HeatmapRegressor(UNet2DModel.from_config(arch["unet_config"]),
                                            reg_cfg, 1))
    else:
        fields = {f.name for f in dataclasses.fields(RegressorConfig)}
        reg_cfg = RegressorConfig(**{k: v for k, v in arch["regressor"].items() if k in fields})
        body = SmpEncoder(SmpRegressor(reg_cfg, 1))
    classes = list(meta["classes"])
    model = ImageClassifier(body, cfg, len(classes))
    model.load_state_dict(load_file(str(out_dir / FORMAT.weights_file), device="cpu"), strict=True)
    return model.to(map_location), classes
