"""Network outputs -> heatmaps whose peak is ~1 for a confident prediction (the decoders'
`min_peak` and the reported confidence read that scale). What a channel means depends on the
loss it was trained with:
  mse:        the raw output (it regresses a target of peak 1).
  bce:        sigmoid(logits), the per-pixel probability of being on the landmark.
  softmax_ce: the spatial softmax times the number of pixels of the training target's class
              region (target > threshold): a prediction spread evenly over that region, which
              is what the loss asks for, has peak 1.
  channel_ce: the logits divided by the channel's maximum where it is positive (peak -> 1),
              unchanged where it is not. The loss only constrains pixels inside a target disc
              (a softmax over channels, no background class), so there is no calibrated
              per-pixel probability. The released code decodes the raw logits with the contour
              decoder at 0.5 x the channel's maximum (downstream_task/utilities.py,
              extract_landmarks); a positive scale leaves that blob, and every other decoder's
              result, unchanged (a min-max rescale would not: it cuts at (min + max) / 2, which
              moves the centroid of an asymmetric blob). Confidence is therefore 1 wherever
              the maximum is positive; a channel whose maximum is <= 0 has no blob under the
              released rule.
"""
from __future__ import annotations

import numpy as np
import torch

from ddpm_landmarks.config.common import HeatmapConfig
from ddpm_landmarks.heatmaps.targets import make_targets


def softmax_region_size(heatmap_cfg: HeatmapConfig, threshold: float, size: int = 64) -> int:
    """Pixels of a training target above `threshold` for a landmark at the grid centre."""
    centre = np.array([[size / 2 - 0.5, size / 2 - 0.5]])
    maps, _ = make_targets(centre, (size, size), heatmap_cfg)
    return max(1, int((maps[0] > threshold).sum()))


def outputs_to_heatmaps(outputs: torch.Tensor, loss_name: str, region_size: int = 1) -> torch.Tensor:
    """(B, K, H, W) network outputs -> heatmaps of peak ~1 (see the module doc), float32."""
    outputs = outputs.float()
    if loss_name == "mse":
        return outputs
    if loss_name == "bce":
        return torch.sigmoid(outputs)
    if loss_name == "softmax_ce":
        b, k, h, w = outputs.shape
        p = torch.softmax(outputs.flatten(2), dim=-1).reshape(b, k, h, w)
        return p * float(region_size)
    if loss_name == "channel_ce":
        hi = outputs.amax(dim=(-2, -1), keepdim=True)
        return torch.where(hi > 0, outputs / hi.clamp(min=1e-30), outputs)
    raise ValueError(f"unknown loss {loss_name!r}; valid: mse, bce, softmax_ce, channel_ce")
