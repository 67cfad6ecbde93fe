"""A fine-tuned landmark regressor on disk (any arch): save_regressor / load_regressor.

    save_regressor(model, "runs/ft/best", config=to_dict(cfg))
    model = load_regressor("runs/ft/best")

The folder (models/artifacts.py, kind "regressor"): regressor.safetensors (the state dict),
regressor.json ({"format": "ddpm_landmarks.regressor", "version": 1, "regressor": the
RegressorConfig (for arch released_unet with its `released` architecture), "num_landmarks": K,
and for the DDPM U-Net its "unet_config"}) and the run's resolved config.yaml. Loading needs no pretraining run, ImageNet file or SSL export: the
architecture is rebuilt at random init from regressor.json, then the weights are loaded strictly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.config.schema import from_dict
from ddpm_landmarks.models.artifacts import FORMATS, read_meta, write_meta
from ddpm_landmarks.models.regressor import HeatmapRegressor
from ddpm_landmarks.models.released_unet import ReleasedUnet
from ddpm_landmarks.models.released_weights import ReleasedRegressor
from ddpm_landmarks.models.smp_regressor import SmpRegressor
from ddpm_landmarks.utils.atomic import atomic_directory
from ddpm_landmarks.utils.modules import unwrap

FORMAT = FORMATS["regressor"]


def _unet_config(unet: UNet2DModel) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dict(unet.config).items() if not k.startswith("_")}


def save_regressor(model: nn.Module, out_dir: str | Path, config: Optional[dict] = None) -> None:
    """out_dir/{regressor.safetensors, regressor.json[, config.yaml]}, atomically
    (utils.atomic.atomic_directory). `config` is the run's resolved config, kept next to the
    weights that it produced."""
    model = unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"regressor": dataclasses.asdict(model.cfg), "num_landmarks": model.num_landmarks}
    if isinstance(model, HeatmapRegressor):
        meta["unet_config"] = _unet_config(model.unet)
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / FORMAT.weights_file), metadata={"format": FORMAT.format})
        write_meta(tmp, "regressor", meta)
        if config is not None:
            (tmp / FORMAT.config_file).write_text(yaml.safe_dump(config, sort_keys=False))


def read_saved_regressor(path: str | Path, what: str = "model.pretrained_path"
                         ) -> tuple[dict, RegressorConfig]:
    """(regressor.json, its RegressorConfig) of a saved regressor; an error that says what the
    folder is instead."""
    if not str(path):
        raise ValueError(f"init='regressor' needs pretrained_path ({what} is empty): a saved "
                         f"landmark regressor, a fine-tuning run's best/ or export/ folder")
    meta = read_meta(path, "regressor", what)
    names = {f.name for f in dataclasses.fields(RegressorConfig)}
    return meta, from_dict(RegressorConfig, {k: v for k, v in meta["regressor"].items()
                                             if k in names}, "regressor.json: regressor")


def load_regressor(out_dir: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a regressor written by save_regressor (module doc)."""
    out_dir = Path(out_dir)
    meta, cfg = read_saved_regressor(out_dir, what="saved regressor")
    state = load_file(str(out_dir / FORMAT.weights_file), device=str(map_location))
    if cfg.arch == "ddpm_unet":
        unet = UNet2DModel.from_config(meta["unet_config"])
        model = HeatmapRegressor(unet, cfg, int(meta["num_landmarks"]),
                                 state.get("alphas_cumprod"))
    elif cfg.arch == "released_unet":
        model = ReleasedRegressor(ReleasedUnet(cfg.released), cfg, int(meta["num_landmarks"]))
    else:
        model = SmpRegressor(cfg, int(meta["num_landmarks"]))
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
