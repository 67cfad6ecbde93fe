"""`model.init=regressor`: start a fine-tuning from a landmark regressor trained on ANOTHER
dataset (supervised landmark pretraining on a source, then the target; the transfer chains of
Di Via et al., ISBI 2024, "Is in-domain data beneficial in transfer learning for landmarks
detection in x-ray images?").

    cfg = RegressorConfig(arch="smp_unetplusplus", init="regressor",
                          pretrained_path="runs/spine_finetune/best")
    model = build_regressor(cfg, num_landmarks=19, image_size=256)   # models.regressor dispatches

`pretrained_path` is a regressor written by save_regressor (a fine-tuning run's best/ or
export/: regressor.json + regressor.safetensors). What is carried over and what is new:

  ddpm_unet: the whole UNet2DModel (its config from regressor.json, not model.preset) except
             `conv_out`, the K-channel head, which is new for the target's landmark count and
             initialised as every head is (models.regressor._make_head; `model.head` may differ
             from the source's). `alphas_cumprod` comes with the source when it had noise_input.
  smp_*:     encoder, decoder, colouriser and the input-normalisation buffers; the segmentation
             head is new (smp_regressor: N(0, 1e-3^2) weights, zero bias). Only that head is a
             new parameter (optim.head_lr); the decoder and colouriser were trained on the source
             and train at optim.lr with the encoder.

The architecture comes from the source: the target config must name the same model.arch and,
per arch, the fields that shape the body (BODY_FIELDS); a conflict is an error naming both values,
never silently resolved. `model.freeze`, `timestep`, `head` (DDPM) and the landmark count are
the target's. `model.input_norm` must stay `auto` (the normalisation is part of the weights).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

# Fields of RegressorConfig that change the body's parameters, per source arch.
BODY_FIELDS = {"ddpm_unet": ("arch", "timestep_mode"),
               "smp_unet": ("arch", "encoder", "gray_adapter"),
               "smp_unetplusplus": ("arch", "encoder", "gray_adapter")}
# State-dict prefix of the K-channel head, which is never carried over.
HEAD_PREFIX = {"ddpm_unet": "unet.conv_out.", "smp_unet": "net.segmentation_head.",
               "smp_unetplusplus": "net.segmentation_head."}


def read_saved_regressor(path: str | Path) -> tuple[dict, "RegressorConfig"]:  # noqa: F821
    """(regressor.json, its RegressorConfig) of a saved regressor, or an error that says what
    the folder is instead."""
    from ddpm_landmarks.models.regressor import FORMAT, META_NAME, RegressorConfig, WEIGHTS_NAME
    if not str(path):
        raise ValueError("init='regressor' needs pretrained_path: a fine-tuning run's best/ or "
                         "export/ folder (a saved landmark regressor)")
    folder = Path(path)
    meta_file = folder / META_NAME
    if not meta_file.is_file():
        if (folder / "config.json").is_file():
            hint = " (it is a DDPM pretraining export: use model.init=pretrained)"
        elif (folder / "encoder.json").is_file():
            hint = (" (it is an SSL encoder export: use model.init=pretrained with "
                    "model.arch=smp_unet)")
        elif (folder / "best" / META_NAME).is_file() or (folder / "export" / META_NAME).is_file():
            hint = (f" (it is a fine-tuning run folder: pass {folder / 'best'} or "
                    f"{folder / 'export'})")
        else:
            hint = "" if folder.is_dir() else " (no such folder)"
        raise FileNotFoundError(f"{str(folder)!r} is not a saved landmark regressor (no "
                                f"{meta_file}){hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_NAME}: missing (regressor without weights)")
    names = {f.name for f in dataclasses.fields(RegressorConfig)}
    return meta, RegressorConfig(**{k: v for k, v in meta["regressor"].items() if k in names})


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


def build_from_regressor(cfg, num_landmarks: int, image_size: int) -> nn.Module:
    """The target regressor: the source's body, a new head for num_landmarks (module doc)."""
    from ddpm_landmarks.models.regressor import WEIGHTS_NAME
    meta, source = read_saved_regressor(cfg.pretrained_path)
    where = str(cfg.pretrained_path)
    check_same_body(cfg, source, where)
    if cfg.input_norm != "auto":
        raise ValueError(f"model.input_norm={cfg.input_norm}: with init=regressor the input "
                         f"normalisation comes with the source's weights; leave it at auto")
    state = load_file(str(Path(where) / WEIGHTS_NAME), device="cpu")
    if cfg.arch == "ddpm_unet":
        model = _ddpm_target(cfg, meta, state, num_landmarks, image_size, where)
    else:
        from ddpm_landmarks.models.smp_regressor import SmpRegressor, check_config
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
    from diffusers import UNet2DModel

    from ddpm_landmarks.models.regressor import HeatmapRegressor, check_unet_size
    unet = UNet2DModel.from_config(meta["unet_config"])
    check_unet_size(unet, image_size)
    alphas = state.get("alphas_cumprod")
    if cfg.noise_input and alphas is None:
        raise ValueError(f"noise_input needs the pretraining scheduler's alphas_cumprod, and the "
                         f"source regressor {where} was trained without noise_input")
    return HeatmapRegressor(unet, cfg, num_landmarks, alphas if cfg.noise_input else None)
