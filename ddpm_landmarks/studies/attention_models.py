"""Trained models as scalar functions of the input image, for the attention analysis
(studies/attention.py): a small registry, saved-model kind (models/artifacts.py) -> loader.

    analysed = load_analysed_model("runs/isbi_finetune")   # or a DDPM / SSL export, a pretraining run
    outputs = analysed.output(images)                      # (B, 1, S, S) in [-1, 1] -> (B,)

Kinds (MODEL_LOADERS; register_model_loader adds one, e.g. "classifier"):
  regressor    a fine-tuning run folder (its best/, else export/) or a saved regressor folder:
               output = sum over landmarks of each heatmap's peak, the heatmaps read as
               evaluation reads them (heatmaps.outputs.outputs_to_heatmaps with the run's loss);
               channel_ce heatmaps are rescaled to peak 1 (zero gradient), so there the raw
               output peaks.
  ddpm_unet    a DDPM export (or a pretraining run folder holding one): output = the L2 norm
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

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.schema import from_dict
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.models.artifacts import describe as describe_folder
from ddpm_landmarks.models.artifacts import identify, saved_config

__all__ = ["AnalysedModel", "MODEL_LOADERS", "register_model_loader", "load_analysed_model"]


@dataclass
class AnalysedModel:
    kind: str
    source: Path                        # the folder the weights came from
    model: nn.Module
    output: Callable[[torch.Tensor], torch.Tensor]   # (B, 1, S, S) in [-1, 1] -> (B,)
    description: str                    # what the scalar is, for the summary files
    image_size: int
    resize_mode: str


Loader = Callable[[Path, torch.device], AnalysedModel]     # (weights folder, device)


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


def _load_regressor(folder: Path, device: torch.device) -> AnalysedModel:
    from ddpm_landmarks.config.finetune import FinetuneConfig
    from ddpm_landmarks.config.schema import load_config
    from ddpm_landmarks.heatmaps.outputs import outputs_to_heatmaps
    from ddpm_landmarks.inference.predictor import HeatmapPredictor
    from ddpm_landmarks.models.saved_regressor import load_regressor
    config_file = saved_config(folder, "regressor")
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
    return AnalysedModel("regressor", folder, model, output,
                          f"sum over landmarks of the {what} ({cfg.loss.name} loss)",
                          cfg.data.image_size, cfg.data.resize_mode)


def _load_ddpm(folder: Path, device: torch.device) -> AnalysedModel:
    from ddpm_landmarks.methods.ddpm import EXPORT, load_exported
    from ddpm_landmarks.models.unet import fold_images, unet_fold
    unet, _, config = load_exported(folder)
    unet = _frozen(unet, device)
    if config.get("data"):
        data = _data_section(config, folder / EXPORT.config_file)
        size, mode = data.image_size, data.resize_mode
    else:                                  # an export from elsewhere: its native size
        size, mode = int(unet.config.sample_size), "stretch"

    def output(images: torch.Tensor) -> torch.Tensor:
        captured = []
        hook = unet.mid_block.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            unet(fold_images(images, unet_fold(unet)), t)
        finally:
            hook.remove()
        return captured[0].float().mean(dim=(2, 3)).norm(dim=1)

    return AnalysedModel("ddpm_unet", folder, unet, output,
                          "L2 norm of the average-pooled mid-block features at t = 0",
                          size, mode)


def _load_ssl_encoder(folder: Path, device: torch.device) -> AnalysedModel:
    from ddpm_landmarks.methods.ssl_base import pooled
    from ddpm_landmarks.models.encoder_weights import SSL_EXPORT, load_ssl_encoder
    encoder, meta = load_ssl_encoder(folder)
    if meta.get("input_norm", "none") != "none":
        raise ConfigError(f"{folder / SSL_EXPORT.meta_file}: input_norm {meta['input_norm']!r} is not "
                          f"supported here (the project's exports see [-1, 1] images: 'none')")
    encoder = _frozen(encoder, device)
    config_file = saved_config(folder, "ssl_encoder")
    if config_file is None:
        raise ConfigError(f"{folder}: an SSL export without {SSL_EXPORT.config_file} (its grid "
                          f"is unknown)")
    data = _data_section(yaml.safe_load(config_file.read_text()) or {}, config_file)
    channels = int(meta["in_channels"])

    def output(images: torch.Tensor) -> torch.Tensor:
        x = images.repeat(1, channels, 1, 1) if channels != 1 else images
        return pooled(encoder, x).float().norm(dim=1)

    return AnalysedModel("ssl_encoder", folder, encoder, output,
                          f"L2 norm of the pooled {meta['encoder']} representation "
                          f"({meta.get('method', 'ssl')})", data.image_size, data.resize_mode)


MODEL_LOADERS: dict[str, Loader] = {
    "regressor": _load_regressor,
    "ddpm_unet": _load_ddpm,
    "ssl_encoder": _load_ssl_encoder,
}


def register_model_loader(kind: str, loader: Loader) -> None:
    """Add a saved-model kind (a models.artifacts.FORMATS key) and its loader."""
    if kind in MODEL_LOADERS:
        raise ValueError(f"attention model kind {kind!r} is already registered")
    MODEL_LOADERS[kind] = loader


def load_analysed_model(path: str | Path, weights: str = "best",
                        device: Optional[str | torch.device] = None) -> AnalysedModel:
    """The model saved at `path` (a saved-model folder, or a run folder's `weights`/ - "best"
    falls back to export/); ConfigError when it is none of MODEL_LOADERS' kinds."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model folder not found: {path}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [weights] + (["export"] if weights == "best" else [])
    for folder in [path] + [path / n for n in names]:
        kind = identify(folder)
        if kind in MODEL_LOADERS:
            return MODEL_LOADERS[kind](folder, dev)
    raise ConfigError(f"{path} is none of: {', '.join(MODEL_LOADERS)} (a fine-tuning run or "
                      f"saved regressor, a DDPM export, an SSL encoder export, or a pretraining "
                      f"run folder holding {weights}/ or export/); it is {describe_folder(path)}")


def describe(analysed: AnalysedModel) -> dict:
    """Plain data for summary.json."""
    return {"kind": analysed.kind, "weights": str(analysed.source),
            "output": analysed.description, "image_size": analysed.image_size,
            "resize_mode": analysed.resize_mode}

