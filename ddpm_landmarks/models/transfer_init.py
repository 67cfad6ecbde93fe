"""`model.init=regressor`: start a fine-tuning from a landmark regressor trained on ANOTHER
dataset (supervised landmark pretraining on a source, then the target; the transfer chains of
Di Via et al., ISBI 2024, "Is in-domain data beneficial in transfer learning for landmarks
detection in x-ray images?").

    cfg = RegressorConfig(arch="smp_unetplusplus", init="regressor",
                          pretrained_path="runs/spine_finetune/best")
    model = build_regressor(cfg, num_landmarks=19, image_size=256)   # models.registry dispatches

`pretrained_path` is a regressor written by save_regressor (a fine-tuning run's best/ or
export/: regressor.json + regressor.safetensors). What is carried over and what is new:

  ddpm_unet: the whole UNet2DModel (its config from regressor.json, not model.preset) except
             `conv_out`, the K-channel head, which is new for the target's landmark count and
             initialised as every head is (models.regressor's make_head; `model.head` may differ
             from the source's). `alphas_cumprod` comes with the source when it had noise_input.
  smp_*:     encoder, decoder, colouriser and the input-normalisation buffers; the segmentation
             head is new (smp_regressor: N(0, 1e-3^2) weights, zero bias). Only that head is a
             new parameter (optim.head_lr); the decoder and colouriser were trained on the source
             and train at optim.lr with the encoder.

The architecture comes from the source: the target config must name the same model.arch and,
per arch, the fields that shape the body (config.finetune.BODY_FIELDS); a conflict is an error naming both values,
never silently resolved. `model.freeze`, `timestep`, `head` (DDPM) and the landmark count are
the target's. `model.input_norm` must stay `auto` (the normalisation is part of the weights).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from diffusers import UNet2DModel
from safetensors.torch import load_file
from torch import nn

from ddpm_landmarks.config.finetune import check_same_body
from ddpm_landmarks.models.regressor import HeatmapRegressor, check_unet_size
from ddpm_landmarks.models.released_unet import ReleasedUnet
from ddpm_landmarks.models.released_weights import ReleasedRegressor
from ddpm_landmarks.models.saved_regressor import FORMAT, read_saved_regressor
from ddpm_landmarks.models.smp_regressor import SmpRegressor, check_config

# State-dict prefix of the K-channel head, which is never carried over.
HEAD_PREFIX = {"ddpm_unet": "unet.conv_out.", "smp_unet": "net.segmentation_head.",
               "smp_unetplusplus": "net.segmentation_head.", "released_unet": "unet.final_conv."}


def build_from_regressor(cfg, num_landmarks: int, image_size: int) -> nn.Module:
    """The target regressor: the source's body, a new head for num_landmarks (module doc)."""
    meta, source = read_saved_regressor(cfg.pretrained_path)
    where = str(cfg.pretrained_path)
    check_same_body(cfg, source, where)
    if cfg.input_norm != "auto":
        raise ValueError(f"model.input_norm={cfg.input_norm}: with init=regressor the input "
                         f"normalisation comes with the source's weights; leave it at auto")
    state = load_file(str(Path(where) / FORMAT.weights_file), device="cpu")
    if cfg.arch == "ddpm_unet":
        if cfg.input_range == "auto":            # the range the source's body was trained on
            cfg = dataclasses.replace(cfg, input_range=source.input_range)
        model = _ddpm_target(cfg, meta, state, num_landmarks, image_size, where)
    elif cfg.arch == "released_unet":           # the source's architecture and input range
        cfg = dataclasses.replace(cfg, released=source.released, input_range=(
            source.input_range if cfg.input_range == "auto" else cfg.input_range))
        model = ReleasedRegressor(ReleasedUnet(cfg.released), cfg, num_landmarks)
    else:
        check_config(cfg, image_size)
        model = SmpRegressor(cfg, num_landmarks)
    head = HEAD_PREFIX[cfg.arch]
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    if model.state_dict().get("alphas_cumprod") is None:
        body.pop("alphas_cumprod", None)     # the target does not noise its input
    result = model.load_state_dict(body, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{where}: the source's weights do not fit the target body; missing "
                         f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    return model


def _ddpm_target(cfg, meta: dict, state: dict, num_landmarks: int, image_size: int,
                 where: str) -> nn.Module:
    unet = UNet2DModel.from_config(meta["unet_config"])
    check_unet_size(unet, image_size)
    alphas = state.get("alphas_cumprod")
    if cfg.noise_input and alphas is None:
        raise ValueError(f"noise_input needs the pretraining scheduler's alphas_cumprod, and the "
                         f"source regressor {where} was trained without noise_input")
    return HeatmapRegressor(unet, cfg, num_landmarks, alphas if cfg.noise_input else None)
