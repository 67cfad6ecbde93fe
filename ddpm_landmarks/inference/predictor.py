"""A trained network as a landmark predictor: outputs -> heatmaps -> points, on the model grid
and in original pixels.

Shared by validation during fine-tuning, `ddpm-landmarks evaluate` and `ddpm-landmarks predict`,
so the three can never disagree:

    predictor = HeatmapPredictor(model, cfg.loss, cfg.heatmap, cfg.decoder, flip_permutation)
    points, confidence = predictor(images)            # (B, K, 2) model grid, (B, K)
    ids, points_original, confidence = predict_dataset(predictor, heatmap_dataset)

Outputs become heatmaps as heatmaps/outputs.py says (the decoders' `min_peak` and the reported
confidence read that scale).

Flip test-time augmentation runs the model on the mirrored image too, mirrors its heatmaps back,
gives each landmark the channel of its mirror-partner (dataset.flip_permutation) and averages.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ddpm_landmarks.config.common import DecoderConfig, HeatmapConfig
from ddpm_landmarks.data.transforms import map_to_original
from ddpm_landmarks.heatmaps.decoders import decode
from ddpm_landmarks.heatmaps.outputs import outputs_to_heatmaps, softmax_region_size


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No gradients, and eval mode for a model in training (validation), switched back after.
    A model already in eval mode is left alone: switching walks every module, which costs
    about a millisecond per call, as much as a refinement patch."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


class HeatmapPredictor:
    def __init__(self, model: torch.nn.Module, loss_cfg, heatmap_cfg: HeatmapConfig,
                 decoder_cfg: DecoderConfig, flip_permutation: Optional[Sequence[int]] = None,
                 flip_tta: bool = False, device: Optional[torch.device | str] = None):
        if flip_tta and flip_permutation is None:
            raise ValueError("flip test-time augmentation needs the dataset's left/right landmark "
                             "permutation; this dataset has none (set eval.flip_tta=false)")
        self.model = model
        self.loss_name = loss_cfg.name
        self.region_size = (softmax_region_size(heatmap_cfg, loss_cfg.softmax_threshold)
                            if loss_cfg.name == "softmax_ce" else 1)
        self.decoder_cfg = decoder_cfg
        self.flip_tta = flip_tta
        self.permutation = None if flip_permutation is None else torch.as_tensor(
            list(flip_permutation), dtype=torch.long)
        self.device = torch.device(device) if device is not None else next(
            model.parameters()).device

    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) model-grid images in [-1, 1] -> (B, K, H, W) heatmaps on the CPU."""
        images = images.to(self.device, torch.float32)
        with eval_mode(self.model):
            maps = outputs_to_heatmaps(self.model(images), self.loss_name, self.region_size)
            if self.flip_tta:
                mirrored = outputs_to_heatmaps(self.model(torch.flip(images, dims=[-1])),
                                               self.loss_name, self.region_size)
                # Mirroring the x axis of a W-wide grid is x -> W - 1 - x in the pixel-centre
                # convention, i.e. exactly torch.flip; landmark i was labelled perm[i] there.
                mirrored = torch.flip(mirrored, dims=[-1])[:, self.permutation.to(maps.device)]
                maps = 0.5 * (maps + mirrored)
        return maps.cpu()

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Points (B, K, 2) on the model grid (NaN = no usable peak) and confidence (B, K)."""
        return decode(self.heatmaps(images), self.decoder_cfg)


def predict_dataset(predictor: HeatmapPredictor, dataset, batch_size: int = 16,
                    num_workers: int = 0) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Run over a HeatmapDataset(train=False): (item indices, points in ORIGINAL pixels
    (N, K, 2) float64, confidence (N, K)). Each point is mapped back with its own image's
    model -> original matrix, as a float."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    indices, points, confidences = [], [], []
    for batch in loader:
        grid_points, confidence = predictor(batch["image"])
        for p, matrix in zip(grid_points, batch["to_original"].numpy()):
            points.append(map_to_original(p, matrix))
        confidences.append(confidence)
        indices.extend(int(i) for i in batch["index"])
    return indices, np.stack(points), np.concatenate(confidences)
