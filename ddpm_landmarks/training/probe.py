"""A cheap few-shot landmark probe of a pretraining model's frozen features.

Representation quality, not sample quality, is what fine-tuning needs, and the two need not
peak at the same pretraining step. During pretraining (`probe.every`, see pretrain.py) the
engine calls the probe as its validation hook under the EMA weights; its `probe/mre` is the
monitored value, so run_dir/best/ holds the pretraining export at the best probe MRE.

    probe = LandmarkProbe(cfg.probe, cfg.data, method.probe_features)   # built once
    values = probe(model)   # {"probe/mre", "probe/sd", "probe/median", "probe/sdr@t", ...}

Built once: `num_train` + `num_val` labelled images drawn (seeded, data/splits.py) from the
probe's pool (data.train_split unless `probe.split`; never data.eval_split), put on the model
grid without augmentation, with Gaussian targets of `probe.sigma`. Each call:
  1. features of the train images without gradient: `features_fn(model, images)` gives a
     list of (B, C_i, h_i, w_i) maps (each method provides its own `probe_features`: the DDPM
     U-Net's decoder blocks, an SSL encoder's stages), resized to the finest map's resolution
     capped at probe.feature_size and concatenated (a hypercolumn), standardised per channel
     with the train images' statistics;
  2. a linear head (a 1x1 conv) fitted in closed form: the exact minimiser of the project's
     heatmap MSE (heatmaps/losses.py, foreground-weighted) on the feature grid (targets
     area-averaged to it) plus `probe.ridge` x |W|^2. No learning rate, step count or init to
     tune, and no optimisation noise between two probes: only the features change;
  3. the val images go through the evaluation path (inference.HeatmapPredictor, predict_dataset:
     the head's output upsampled bilinearly to the model grid, parabola decoding without
     abstaining (decoders.NEVER_ABSTAIN; probe/missed counts channels with no location), each point mapped back to ORIGINAL pixels by its image's inverse transform;
     evaluate.evaluate_predictions): errors in the dataset's unit (mm for ISBI and synthetic).
The same model gives the same values; the global random state is left as it was.

Measured on the synthetic set at 64 px (tiny U-Net, 10 + 10 images): a random-init U-Net
probes at 1.2-1.6 mm, the same U-Net after 300 DDPM steps at 0.75-0.9 mm. The last decoder
features alone (conv_out's input, what fine-tuning's head sees) probed at 11-16 mm for both:
at t = 0 they encode the noise estimate, hence the hypercolumn.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import default_collate

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    FewShotConfig,
    HeatmapConfig,
)
from ddpm_landmarks.config.finetune import LossConfig
from ddpm_landmarks.config.pretrain import ProbeConfig
from ddpm_landmarks.config.schema import from_dict
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import make_fewshot_split
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.evaluation.evaluate import evaluate_predictions, ground_truths
from ddpm_landmarks.heatmaps.decoders import NEVER_ABSTAIN
from ddpm_landmarks.heatmaps.losses import heatmap_loss
from ddpm_landmarks.inference.predictor import HeatmapPredictor, predict_dataset

FeatureFn = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]

__all__ = ["LandmarkProbe", "ProbeConfig", "probe_data_config", "resize_features"]


def resize_features(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Feature maps of any resolutions -> one (B, sum C, *size) hypercolumn: larger maps are
    area-averaged, smaller ones upsampled bilinearly (align_corners=False: pixel centres)."""
    out = []
    for m in maps:
        if tuple(m.shape[-2:]) == tuple(size):
            out.append(m)
        elif m.shape[-2] > size[0]:
            out.append(F.adaptive_avg_pool2d(m, size))
        else:
            out.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
    return torch.cat(out, dim=1)


def probe_data_config(cfg: ProbeConfig, run_data: DataConfig) -> DataConfig:
    """The probe's data section: `probe.dataset`'s `data` (any YAML with a data section) or the
    run's; always on the run's model grid (data.image_size)."""
    data = run_data
    if cfg.dataset:
        path = Path(cfg.dataset)
        if not path.is_file():
            raise ConfigError(f"probe.dataset: config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), dict):
            raise ConfigError(f"probe.dataset: {path} has no 'data' section")
        data = from_dict(DataConfig, loaded["data"], prefix=f"{path}: data")
    return dataclasses.replace(data, image_size=run_data.image_size)


def _check(cfg: ProbeConfig) -> None:
    positive = {"num_train": cfg.num_train, "num_val": cfg.num_val,
                "feature_size": cfg.feature_size, "batch_size": cfg.batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"probe.{key} must be >= 1, got {value}")
    for key in ("sigma", "foreground_weight"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"probe.{key} must be > 0, got {getattr(cfg, key)}")
    if not cfg.ridge > 0:
        raise ConfigError(f"probe.ridge must be > 0 (it keeps the head's least squares "
                          f"well-posed), got {cfg.ridge}")
    if cfg.every < 0:
        raise ConfigError(f"probe.every must be >= 0 (0 = off), got {cfg.every}")


def _pixel_weights(targets: torch.Tensor, mask: torch.Tensor, loss_cfg: LossConfig
                   ) -> torch.Tensor:
    """(B, K, h, w) pixel weights of mse_heatmap_loss: the foreground weighting divided by each
    channel's weight sum (a weighted mean per channel), 0 for missing channels."""
    w = torch.where(targets > loss_cfg.foreground_threshold,
                    torch.full_like(targets, loss_cfg.foreground_weight), torch.ones_like(targets))
    w = w / w.sum(dim=(-2, -1), keepdim=True)
    return w * mask[:, :, None, None].to(w.dtype)


def fit_linear_head(features: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    loss_cfg: LossConfig, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (K, C), bias (K,)) of the 1x1 conv minimising, for each landmark k, its
    mse_heatmap_loss (weighted mean over pixels, mean over the images where k is present) plus
    ridge * |weight_k|^2, exactly: weighted least squares, Gram matrices in float32 on the
    features' device, solved in float64. Summed over k this is mse_heatmap_loss up to the
    weighting of landmarks missing in some images."""
    b, c, h, w = features.shape
    k = targets.shape[1]
    x = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    x = x.permute(0, 2, 3, 1).reshape(-1, c + 1)                       # (B h w, C + 1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, k).to(x.dtype)
    weights = _pixel_weights(targets, mask, loss_cfg).permute(0, 2, 3, 1).reshape(-1, k)
    reg = torch.full((c + 1,), float(ridge), dtype=torch.float64, device=x.device)
    reg[-1] = 0.0                                                      # the bias is free
    solution = []
    present = mask.sum(dim=0)                                          # images per landmark
    for j in range(k):
        if not present[j]:               # never labelled in the train images: predicts 0,
            solution.append(torch.zeros(c + 1, dtype=torch.float64, device=x.device))
            continue                     # decoded as missing
        xw = x * (weights[:, j:j + 1] / present[j].to(x.dtype))
        # Positive definite for ridge > 0 (the bias column too, since some weight is > 0).
        gram = (xw.T @ x).double() + torch.diag(reg)
        solution.append(torch.linalg.solve(gram, (xw.T @ y[:, j]).double()))
    beta = torch.stack(solution, dim=1).to(features.dtype)             # (C + 1, K)
    return beta[:-1].T.contiguous(), beta[-1].contiguous()


class _Head(nn.Module):
    """Standardise features (train statistics), 1x1 conv, upsample to the model grid."""

    def __init__(self, features: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.mean = features.mean(dim=(0, 2, 3), keepdim=True)
        std = features.std(dim=(0, 2, 3), keepdim=True)
        # Dead channels (constant over the train images) must not blow up on val images.
        self.std = std.clamp_min(1e-6 + 1e-3 * float(std.mean()))
        self.grid = grid
        self.weight = self.bias = None

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def raw(self, normalised: torch.Tensor) -> torch.Tensor:
        """Heatmaps on the feature grid."""
        return F.conv2d(normalised, self.weight[:, :, None, None], self.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.raw(self.normalise(features))
        if tuple(out.shape[-2:]) != self.grid:
            out = F.interpolate(out, size=self.grid, mode="bilinear", align_corners=False)
        return out


class _ProbeNet(nn.Module):
    """images -> heatmaps: frozen features of the model (a closure, not a submodule, so the
    predictor's eval()/train() toggling never reaches it) and the fitted head."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], head: _Head):
        super().__init__()
        self.head = head
        self._features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(images))


class LandmarkProbe:
    def __init__(self, cfg: ProbeConfig, run_data: DataConfig, features_fn: FeatureFn):
        _check(cfg)
        self.cfg, self.features_fn = cfg, features_fn
        data = probe_data_config(cfg, run_data)
        split_name = cfg.split or data.train_split
        if split_name == data.eval_split:
            raise ConfigError(f"probe.split: {split_name!r} is data.eval_split, the split results "
                              f"are reported on; the probe must pick checkpoints on training "
                              f"images")
        pool = build_dataset(data).split(split_name)
        if cfg.num_train + cfg.num_val > len(pool):
            raise ConfigError(f"probe.num_train ({cfg.num_train}) + probe.num_val "
                              f"({cfg.num_val}) images are more than the {len(pool)} of "
                              f"{pool.name}")
        split = make_fewshot_split(pool.ids, FewShotConfig(
            budget=cfg.num_train, seed=cfg.seed, draw=0, policy="random",
            val_policy="fixed_count", val_count=cfg.num_val))
        self.train_ids, self.val_ids = split.train_ids, split.val_ids
        self.heatmap_cfg = HeatmapConfig(kind="gaussian", sigma=cfg.sigma)
        no_aug = AugmentConfig(flip_prob=0.0)

        def items(ids: list[str]) -> tuple[HeatmapDataset, list[dict]]:
            ds = HeatmapDataset(pool.subset(ids), data, no_aug, self.heatmap_cfg, train=False)
            return ds, [ds[i] for i in range(len(ds))]

        _, train_items = items(self.train_ids)
        batch = default_collate(train_items)
        self.images, self.targets, self.mask = batch["image"], batch["heatmaps"], batch["mask"]
        val_ds, self.val_items = items(self.val_ids)       # a list is a map-style dataset
        self.val_dataset = val_ds.dataset
        self.truths = ground_truths(self.val_dataset)
        self.num_landmarks = pool.num_landmarks
        self.grid = (data.image_size, data.image_size)
        self.loss_cfg = LossConfig(name="mse", foreground_weight=cfg.foreground_weight)
        self.decoder = DecoderConfig(name="parabola", min_peak=NEVER_ABSTAIN)
        self.eval_cfg = EvalConfig(sdr_thresholds=cfg.sdr_thresholds, flip_tta=False,
                                   batch_size=cfg.batch_size)

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 hypercolumn of `model` for images on its device."""
        with torch.no_grad():
            maps = self.features_fn(model, images)
            # The finest map's resolution (never upsampled beyond it), capped at feature_size.
            size = (min(self.cfg.feature_size, max(m.shape[-2] for m in maps)),
                    min(self.cfg.feature_size, max(m.shape[-1] for m in maps)))
            return resize_features([m.float() for m in maps], size)

    def _train_features(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        bs = self.cfg.batch_size
        return torch.cat([self.features(model, self.images[i:i + bs].to(device))
                          for i in range(0, len(self.images), bs)])

    def __call__(self, model: nn.Module) -> dict:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            # No randomness of its own; the fork keeps predict_dataset's DataLoader from
            # advancing the global RNG (it draws a base seed), so training is unaffected.
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                features = self._train_features(model, device)
                head = _Head(features, self.grid)
                features = head.normalise(features)
                size = tuple(features.shape[-2:])
                # Targets on the feature grid (area mean), where the head is fitted.
                targets = F.adaptive_avg_pool2d(self.targets.to(device), size)
                mask = self.mask.to(device)
                head.weight, head.bias = fit_linear_head(features, targets, mask,
                                                         self.loss_cfg, self.cfg.ridge)
                loss = heatmap_loss("mse", head.raw(features), targets, mask,
                                    **self.loss_cfg.kwargs())
                net = _ProbeNet(lambda images: self.features(model, images), head)
                predictor = HeatmapPredictor(net, self.loss_cfg, self.heatmap_cfg, self.decoder,
                                             device=device)
                indices, points, _ = predict_dataset(predictor, self.val_items,
                                                     self.cfg.batch_size)
        finally:
            model.train(was_training)
        assert indices == list(range(len(self.truths)))
        summary = evaluate_predictions(self.val_dataset, self.truths, points, self.eval_cfg)
        values = {"probe/mre": summary["mre"], "probe/sd": summary["sd"],
                  "probe/median": summary["median"], "probe/missed": summary["missed"]}
        values.update({f"probe/sdr@{t:g}": v for t, v in summary["sdr"].items()})
        values["probe/train_loss"] = float(loss)
        values["probe/seconds"] = time.perf_counter() - t0
        return values

    def describe(self) -> str:
        return (f"landmark probe: linear head on frozen features, {len(self.train_ids)} train / "
                f"{len(self.val_ids)} val images of {self.val_dataset.name}")

