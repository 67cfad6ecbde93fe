"""Heatmap regression losses: small pure torch functions.

Every loss takes
    pred    (B, K, H, W) raw network outputs (values for "mse", logits for the others),
    target  (B, K, H, W) float in [0, 1] (see heatmaps/targets.py: Gaussian peak 1, or disc),
    mask    (B, K) bool, False = landmark missing / outside the grid (or None = all present),
and returns a float32 scalar.

Reduction, shared by all losses: each (sample, landmark) channel gets one loss value; the
result is the mean of those values over the PRESENT channels of the whole batch
(sum over mask True / number of mask True). A masked channel contributes nothing and gets a
zero gradient (it is selected out with torch.where, so even a non-finite pred there cannot
leak into the loss value). An all-masked batch gives 0 with a zero (finite) gradient, not NaN.

Inputs of any floating dtype (e.g. bfloat16 under autocast) are upcast to float32 before the
loss is computed; the result is float32 and the gradient flows back in pred's own dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _prepare(pred: Tensor, target: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    if pred.ndim != 4:
        raise ValueError(f"pred must be (B, K, H, W), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
    b, k = pred.shape[:2]
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool, device=pred.device)
    if tuple(mask.shape) != (b, k):
        raise ValueError(f"mask must be (B, K) = {(b, k)}, got shape {tuple(mask.shape)}")
    return pred.float(), target.float(), mask.to(device=pred.device, dtype=torch.bool)


def _masked_channel_mean(per_channel: Tensor, mask: Tensor) -> Tensor:
    """Mean of the (B, K) per-channel losses over mask True; 0 (zero gradient) if none."""
    selected = torch.where(mask, per_channel, torch.zeros_like(per_channel))
    n_present = mask.sum().clamp(min=1).to(per_channel.dtype)
    return selected.sum() / n_present


def mse_heatmap_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor],
                     foreground_weight: float = 1.0,
                     foreground_threshold: float = 0.1) -> Tensor:
    """Foreground-weighted squared error.

    Pixel weight w = foreground_weight where target > foreground_threshold, else 1.
    Per channel: sum(w * (pred - target)^2) / sum(w)  -- a weighted MEAN over the pixels, so
    with foreground_weight = 1 it is the plain per-pixel MSE and the scale does not depend on
    the image size. Then the mean over present channels. A Gaussian target is mostly
    background; foreground_weight > 1 keeps the network from settling on all zeros.
    """
    if not foreground_weight > 0:
        raise ValueError(f"foreground_weight must be positive, got {foreground_weight}")
    pred, target, mask = _prepare(pred, target, mask)
    weight = torch.where(target > foreground_threshold,
                         torch.full_like(target, float(foreground_weight)),
                         torch.ones_like(target))
    sq = (pred - target) ** 2
    per_channel = (weight * sq).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1))
    return _masked_channel_mean(per_channel, mask)


def bce_heatmap_loss(pred_logits: Tensor, target: Tensor, mask: Optional[Tensor],
                     pos_weight: Optional[Union[float, Tensor]] = None) -> Tensor:
    """Binary cross-entropy with logits per pixel (soft targets allowed), mean over the H*W
    pixels of a channel, then mean over present channels.

    pos_weight: None, a float, or a (K,) tensor (one weight per landmark) multiplying the
    positive term, as in F.binary_cross_entropy_with_logits.
    """
    pred_logits, target, mask = _prepare(pred_logits, target, mask)
    if pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=pred_logits.device)
        if pw.ndim == 1:
            if pw.shape[0] != pred_logits.shape[1]:
                raise ValueError(f"pos_weight must be a scalar or (K,) = ({pred_logits.shape[1]},), "
                                 f"got shape {tuple(pw.shape)}")
            pw = pw[:, None, None]          # (K, 1, 1): broadcasts over (B, K, H, W)
        elif pw.ndim != 0:
            raise ValueError(f"pos_weight must be a scalar or a (K,) tensor, got shape {tuple(pw.shape)}")
        pos_weight = pw
    per_pixel = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none",
                                                   pos_weight=pos_weight)
    per_channel = per_pixel.mean(dim=(-2, -1))
    return _masked_channel_mean(per_channel, mask)


def spatial_softmax_ce_loss(pred_logits: Tensor, target: Tensor, mask: Optional[Tensor],
                            threshold: float = 0.5, on_empty: str = "mask") -> Tensor:
    """Spatial cross-entropy: a softmax over all H*W pixels of a channel against the
    thresholded target normalised to a distribution over pixels (the disc targets of the
    original code; see channel_softmax_ce_loss for its literal loss, a softmax over channels).

    q = (target > threshold) / count;  per channel: -sum_pixels q * log_softmax(pred);
    then the mean over present channels. With a single-pixel target this is exactly
    F.cross_entropy on the flattened channel with that pixel as the class.

    A present channel (mask True) whose thresholded target is empty has no distribution:
      on_empty="mask" (default): the channel is treated as masked. This is reachable with
        data/heatmaps.make_targets: a Gaussian point up to 3 sigma outside the grid keeps
        mask True, but its on-grid values fall below 0.5 from ~1.18 sigma outside (and a very
        small sigma can leave no pixel > 0.5 even inside), so raising would stop training on
        legitimate augmented samples.
      on_empty="error": ValueError naming the (sample, channel) -- for strict checking.
    """
    if on_empty not in ("mask", "error"):
        raise ValueError(f"on_empty must be 'mask' or 'error', got {on_empty!r}")
    pred_logits, target, mask = _prepare(pred_logits, target, mask)
    b, k = pred_logits.shape[:2]
    hard = (target > threshold).float().flatten(2)          # (B, K, H*W)
    count = hard.sum(dim=-1)                                # (B, K)
    empty = mask & (count == 0)
    if bool(empty.any()):
        if on_empty == "error":
            idx = [tuple(int(v) for v in row) for row in empty.nonzero()]
            raise ValueError(f"thresholded target (> {threshold}) is empty for present "
                             f"(sample, channel) {idx}; mask it or lower the threshold")
        mask = mask & ~empty
    q = hard / count.clamp(min=1.0)[..., None]
    log_p = torch.log_softmax(pred_logits.flatten(2), dim=-1)
    per_channel = -(q * log_p).sum(dim=-1)
    return _masked_channel_mean(per_channel.reshape(b, k), mask)


def channel_softmax_ce_loss(pred_logits: Tensor, target: Tensor, mask: Optional[Tensor],
                            threshold: float = 0.5) -> Tensor:
    """The released DDPM-landmark code, literally: `nn.CrossEntropyLoss()(pred, heatmaps)` with
    (B, K, H, W) binary disc targets, i.e. at every pixel a softmax over the K LANDMARK
    CHANNELS against the (target > threshold) indicator, averaged over all B*H*W pixels.

    Pixels outside every disc have an all-zero target and contribute 0 (there is no
    background class); a pixel inside two overlapping discs counts both. A masked (missing)
    landmark is taken out of the softmax altogether (its logits replaced by -1e9, which the
    released code, without missing landmarks, never needed), so it has no effect and zero
    gradient. Unlike the other losses the reduction is over pixels, as torch's "mean" does
    for probability targets, so the loss does not split into per-channel terms.
    """
    pred_logits, target, mask = _prepare(pred_logits, target, mask)
    present = mask[..., None, None]
    hard = (target > threshold).float() * present.float()
    logits = torch.where(present, pred_logits, torch.full_like(pred_logits, -1e9))
    log_p = torch.log_softmax(logits, dim=1)
    b, _, h, w = pred_logits.shape
    return -(hard * log_p).sum() / float(b * h * w)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse_heatmap_loss,
    "bce": bce_heatmap_loss,
    "softmax_ce": spatial_softmax_ce_loss,
    "channel_ce": channel_softmax_ce_loss,
}


def heatmap_loss(name: str, pred: Tensor, target: Tensor, mask: Optional[Tensor],
                 **kwargs) -> Tensor:
    """Dispatch to LOSSES[name](pred, target, mask, **kwargs)."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown heatmap loss {name!r}; valid names: {sorted(LOSSES)}") from None
    return fn(pred, target, mask, **kwargs)
