"""Fine-tuning as a method of the shared engine: a heatmap regressor trained on labelled images.

    method = HeatmapRegressionMethod(model, cfg.loss)
    loss, logs = method.loss(model, batch)   # batch: HeatmapDataset items collated (a dict)

The engine sees the same interface as for pretraining (loss / log_images / export), so
fine-tuning gets accumulation, mixed precision, EMA, checkpoints, resume and logging for free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ddpm_landmarks.heatmaps.losses import heatmap_loss
from ddpm_landmarks.heatmaps.outputs import outputs_to_heatmaps, softmax_region_size
from ddpm_landmarks.methods.base import Method
from ddpm_landmarks.models.regressor import HeatmapRegressor
from ddpm_landmarks.models.saved_regressor import save_regressor


class HeatmapRegressionMethod(Method):
    def __init__(self, model: HeatmapRegressor, loss_cfg, heatmap_cfg=None):
        self.model = model
        self.loss_cfg = loss_cfg
        self.loss_kwargs = loss_cfg.kwargs()
        self.region_size = (softmax_region_size(heatmap_cfg, loss_cfg.softmax_threshold)
                            if loss_cfg.name == "softmax_ce" and heatmap_cfg is not None else 1)
        # A landmark-conditioned local network (refinement patches) also takes the index.
        self.conditioned = getattr(getattr(model, "cfg", None), "landmark_embedding", 0) > 0

    def _forward(self, model: torch.nn.Module, batch: dict, rows: slice = slice(None)):
        if self.conditioned:
            return model(batch["image"][rows], batch["landmark"][rows])
        return model(batch["image"][rows])

    def loss(self, model: torch.nn.Module, batch: dict,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        pred = self._forward(model, batch)
        loss = heatmap_loss(self.loss_cfg.name, pred, batch["heatmaps"], batch["mask"],
                            **self.loss_kwargs)
        return loss, {}

    def log_images(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Rows of [image | target heatmaps | predicted heatmaps] (max over landmarks)."""
        images = batch["image"][:4].float()
        pred = outputs_to_heatmaps(self._forward(model, {**batch, "image": images}, slice(0, 4)),
                                   self.loss_cfg.name, self.region_size)
        gray = (images + 1) / 2

        def tint(maps: torch.Tensor, colour: int) -> torch.Tensor:
            peak = maps.amax(dim=1, keepdim=True).clamp(0, 1)
            rgb = gray.repeat(1, 3, 1, 1) * (1 - 0.6 * peak)
            rgb[:, colour:colour + 1] += 0.6 * peak
            return rgb

        rows = torch.cat([gray.repeat(1, 3, 1, 1), tint(batch["heatmaps"][:4].float(), 1),
                          tint(pred, 0)], dim=-1)
        return {"heatmaps": rows}

    def export(self, model: torch.nn.Module, out_dir: Path, config_dict: dict) -> None:
        save_regressor(model, out_dir, config=config_dict)
