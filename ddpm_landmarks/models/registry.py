"""model.arch -> builder(cfg, num_landmarks, image_size): the registry of heatmap regressors,
and load_saved(path) for any saved model (models/artifacts.py says which kind a folder is).

    model = build_regressor(cfg.model, num_landmarks=19, image_size=256)

`model.init=regressor` (any arch) goes through models/transfer_init.py: the body of a regressor
fine-tuned on another dataset, a new head for this one. `released_unet` is the released code's
U-Net (models/released_weights.py: its checkpoints with model.init=released_ddpm).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.models.artifacts import ArtifactError, describe, identify
from ddpm_landmarks.models.regressor import build_ddpm_regressor
from ddpm_landmarks.models.released_weights import build_released_regressor
from ddpm_landmarks.models.smp_regressor import build_smp_regressor
from ddpm_landmarks.models.transfer_init import build_from_regressor

Builder = Callable[[RegressorConfig, int, int], nn.Module]

ARCHS: dict[str, Builder] = {
    "ddpm_unet": build_ddpm_regressor,
    "smp_unet": build_smp_regressor,
    "smp_unetplusplus": build_smp_regressor,
    "released_unet": build_released_regressor,
}


def build_regressor(cfg: RegressorConfig, num_landmarks: int, image_size: int) -> nn.Module:
    """The regressor of cfg.arch at cfg.init."""
    builder = ARCHS.get(cfg.arch)
    if builder is None:
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: {', '.join(ARCHS)}")
    if cfg.init == "regressor":
        return build_from_regressor(cfg, num_landmarks, image_size)
    return builder(cfg, num_landmarks, image_size)


def load_saved(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Any saved model folder as a module: a DDPM export (UNet2DModel), an SSL encoder export
    (the smp encoder), a saved regressor or classifier."""
    kind = identify(path)
    if kind == "ddpm_unet":
        from diffusers import UNet2DModel
        return UNet2DModel.from_pretrained(path).to(map_location)
    if kind == "ssl_encoder":
        from ddpm_landmarks.models.encoder_weights import load_ssl_encoder
        return load_ssl_encoder(path)[0].to(map_location)
    if kind == "regressor":
        from ddpm_landmarks.models.saved_regressor import load_regressor
        return load_regressor(path, map_location)
    if kind == "classifier":
        from ddpm_landmarks.models.classifier import load_classifier
        return load_classifier(path, map_location)[0]
    raise ArtifactError(f"{str(path)!r} is not a saved model; it is {describe(path)}")
