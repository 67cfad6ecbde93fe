"""Trained models as scalar functions of the input image, for the attention analysis
(evaluation/attention.py): a small registry, kind -> loader.

    target = load_target("runs/isbi_finetune")        # or a DDPM / SSL export, a pretraining run
    outputs = target.output(images)                   # (B, 1, S, S) in [-1, 1] -> (B,)

Kinds, tried in this order (TARGET_LOADERS; register_target adds one, e.g. a classifier):
  regressor    a fine-tuning run folder (its best/, else export/) or a saved regressor folder:
               output = sum over landmarks of each heatmap's peak, the heatmaps read as
               evaluation reads them (inference.outputs_to_heatmaps with the run's loss);
               channel_ce heatmaps are rescaled to peak 1 (zero gradient), so there the raw
               output peaks.
  ddpm         a DDPM export (or a pretraining run folder holding one): output = the L2 norm
               of the globally average-pooled mid-block (bottleneck) features at t = 0.
  ssl_encoder  an SSL encoder export (or its pretraining run folder): output = the L2 norm of
               the representation SimCLR / MoCo train on, the global average pool of the
               deepest stage (methods.ssl_base.pooled).
Every model is in eval mode (no batch statistics: each image's output depends on it alone)
with frozen parameters; only the input gets a gradient. `image_size` / `resize_mode` are the
grid the model was trained on, read from its own config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from torch import nn

from ddpm_landmarks.config import ConfigError, DataConfig, from_dict

__all__ = ["SaliencyTarget", "TARGET_LOADERS", "register_target", "load_target"]


@dataclass
class SaliencyTarget:
    kind: str
    source: Path                        # the folder the weights came from
    model: nn.Module
    output: Callable[[torch.Tensor], torch.Tensor]   # (B, 1, S, S) in [-1, 1] -> (B,)
    description: str                    # what the scalar is, for the summary files
    image_size: int
    resize_mode: str


Loader = Callable[[Path, str, torch.device], Optional[SaliencyTarget]]   # None: not my kind


def _weights_folder(path: Path, weights: str, marker: str) -> Optional[Path]:
    """`path` itself when it holds `marker`, else its `weights` subfolder ("best" falls back
    to "export"), else None."""
    if (path / marker).is_file():
        return path
    names = [weights] + (["export"] if weights == "best" else [])
    for name in names:
        if (path / name / marker).is_file():
            return path / name
    return None


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _data_section(config: dict, where: Path) -> DataConfig:
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: no data section (the model's grid is unknown)")
    return from_dict(DataConfig, data, prefix=f"{where}: data")


def _load_regressor(path: Path, weights: str, device: torch.device) -> Optional[SaliencyTarget]:
    from ddpm_landmarks.config import load_config
    from ddpm_landmarks.evaluation.inference import HeatmapPredictor, outputs_to_heatmaps
    from ddpm_landmarks.models.regressor import load_regressor
    from ddpm_landmarks.training.finetune_config import FinetuneConfig
    folder = _weights_folder(path, weights, "regressor.json")
    if folder is None:
        return None
    config_file = next((f for f in (folder / "config.yaml", folder.parent / "config.yaml")
                        if f.is_file()), None)
    if config_file is None:
        raise ConfigError(f"{folder}: a saved regressor without its config.yaml (loss, grid)")
    cfg = load_config(config_file, cls=FinetuneConfig)
    model = _frozen(load_regressor(folder, map_location=device), device)
    # The predictor knows how each loss's outputs become heatmaps (softmax region size, ...).
    predictor = HeatmapPredictor(model, cfg.loss, cfg.heatmap, cfg.decoder, device=device)
    raw = cfg.loss.name == "channel_ce"

    def output(images: torch.Tensor) -> torch.Tensor:
        out = model(images)
        maps = out.float() if raw else outputs_to_heatmaps(out, predictor.loss_name,
                                                           predictor.region_size)
        return maps.amax(dim=(-2, -1)).sum(dim=1)

    what = "raw output peaks" if raw else "heatmap peaks"
    return SaliencyTarget("regressor", folder, model, output,
                          f"sum over landmarks of the {what} ({cfg.loss.name} loss)",
                          cfg.data.image_size, cfg.data.resize_mode)


def _load_ddpm(path: Path, weights: str, device: torch.device) -> Optional[SaliencyTarget]:
    from ddpm_landmarks.methods.ddpm import CONFIG_NAME, load_exported
    folder = _weights_folder(path, weights, "diffusion_pytorch_model.safetensors")
    if folder is None:
        return None
    unet, _, config = load_exported(folder)
    unet = _frozen(unet, device)
    if config.get("data"):
        data = _data_section(config, folder / CONFIG_NAME)
        size, mode = data.image_size, data.resize_mode
    else:                                  # an export from elsewhere: its native size
        size, mode = int(unet.config.sample_size), "stretch"

    def output(images: torch.Tensor) -> torch.Tensor:
        captured = []
        hook = unet.mid_block.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            unet(images, t)
        finally:
            hook.remove()
        return captured[0].float().mean(dim=(2, 3)).norm(dim=1)

    return SaliencyTarget("ddpm", folder, unet, output,
                          "L2 norm of the average-pooled mid-block features at t = 0",
                          size, mode)


def _load_ssl_encoder(path: Path, weights: str, device: torch.device
                      ) -> Optional[SaliencyTarget]:
    from ddpm_landmarks.methods.ssl_base import (ENCODER_META, EXPORT_CONFIG, load_ssl_encoder,
                                                 pooled)
    folder = _weights_folder(path, weights, ENCODER_META)
    if folder is None:
        return None
    encoder, meta = load_ssl_encoder(folder)
    if meta.get("input_norm", "none") != "none":
        raise ConfigError(f"{folder / ENCODER_META}: input_norm {meta['input_norm']!r} is not "
                          f"supported here (the project's exports see [-1, 1] images: 'none')")
    encoder = _frozen(encoder, device)
    config_file = folder / EXPORT_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"{folder}: an SSL export without {EXPORT_CONFIG} (its grid is unknown)")
    data = _data_section(yaml.safe_load(config_file.read_text()) or {}, config_file)
    channels = int(meta["in_channels"])

    def output(images: torch.Tensor) -> torch.Tensor:
        x = images.repeat(1, channels, 1, 1) if channels != 1 else images
        return pooled(encoder, x).float().norm(dim=1)

    return SaliencyTarget("ssl_encoder", folder, encoder, output,
                          f"L2 norm of the pooled {meta['encoder']} representation "
                          f"({meta.get('method', 'ssl')})", data.image_size, data.resize_mode)


TARGET_LOADERS: dict[str, Loader] = {
    "regressor": _load_regressor,
    "ddpm": _load_ddpm,
    "ssl_encoder": _load_ssl_encoder,
}


def register_target(kind: str, loader: Loader) -> None:
    """Add a model kind (tried after the ones registered before it)."""
    if kind in TARGET_LOADERS:
        raise ValueError(f"saliency target kind {kind!r} is already registered")
    TARGET_LOADERS[kind] = loader


def load_target(path: str | Path, weights: str = "best",
                device: Optional[str | torch.device] = None) -> SaliencyTarget:
    """The first kind whose loader recognises `path`; ConfigError when none does."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model folder not found: {path}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for loader in TARGET_LOADERS.values():
        target = loader(path, weights, dev)
        if target is not None:
            return target
    raise ConfigError(f"{path} is none of: {', '.join(TARGET_LOADERS)} (a fine-tuning run or "
                      f"saved regressor, a DDPM export, an SSL encoder export, or a pretraining "
                      f"run folder holding {weights}/ or export/)")


def describe(target: SaliencyTarget) -> dict:
    """Plain data for summary.json."""
    return {"kind": target.kind, "weights": str(target.source), "output": target.description,
            "image_size": target.image_size, "resize_mode": target.resize_mode}

