"""Labelled images as training / evaluation tensors for heatmap regression.

    train = HeatmapDataset(dataset.subset(split.train_ids), cfg.data, cfg.augment, cfg.heatmap,
                           train=True, seed=cfg.train.seed)
    item = train[0]   # {"image", "heatmaps", "mask", "landmarks", "to_original", "index"}

Each item goes through LandmarkTransform (resize to the model grid + augmentation, landmarks moved
with the same matrix) and make_targets. `to_original` (model grid -> original pixels) travels
with the item, so a prediction decoded on the model grid is mapped back exactly, per image.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ddpm_landmarks.config.common import AugmentConfig, DataConfig, HeatmapConfig
from ddpm_landmarks.data.intensity import to_model_input
from ddpm_landmarks.data.randomness import ItemRandomness
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.data.transforms import LandmarkTransform
from ddpm_landmarks.heatmaps.targets import make_targets


class HeatmapDataset(ItemRandomness, torch.utils.data.Dataset):
    def __init__(self, dataset: LandmarkDataset, data_cfg: DataConfig, aug_cfg: AugmentConfig,
                 heatmap_cfg: HeatmapConfig, train: bool, seed: int = 0):
        self.dataset = dataset
        self.size = int(data_cfg.image_size)
        self.heatmap_cfg = heatmap_cfg
        self.intensity_norm = data_cfg.intensity_norm
        self.train = train
        # Refuses flips without the dataset's left/right permutation (even for evaluation).
        self.transform = LandmarkTransform(data_cfg, aug_cfg, dataset.flip_permutation,
                                           train=train, dataset_name=dataset.name)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.item(int(index), self.item_rng(index) if self.train else None)

    def item(self, index: int, rng: Optional[np.random.Generator]) -> dict:
        """Item `index` augmented with `rng` (None: the deterministic resize only)."""
        sample = self.dataset[int(index)]
        t = self.transform(sample, rng)
        heatmaps, mask = make_targets(t.landmarks, (self.size, self.size), self.heatmap_cfg)
        return {
            # [-1, 1] like pretraining (data.intensity_norm: fixed or per-image min-max)
            "image": torch.from_numpy(to_model_input(t.image, self.intensity_norm)).unsqueeze(0),
            "heatmaps": torch.from_numpy(heatmaps),
            "mask": torch.from_numpy(mask),
            "landmarks": torch.from_numpy(t.landmarks.astype(np.float32)),  # model grid, NaN = missing
            "to_original": torch.from_numpy(t.to_original),               # float64 3x3
            "index": int(index),
        }
