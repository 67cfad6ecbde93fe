"""Labelled items for heatmap training: targets where the landmarks are, exact way back."""
import numpy as np
import pytest
import torch

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    DecoderConfig,
    HeatmapConfig,
)
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.transforms import map_to_original
from ddpm_landmarks.heatmaps.decoders import decode


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path_factory.mktemp("syn")), image_size=48,
                     synthetic_num_images=6, synthetic_image_size=80, synthetic_num_landmarks=4)
    return cfg, build_dataset(cfg)


def test_eval_items_decode_back_to_the_original_landmarks(synthetic):
    cfg, ds = synthetic
    items = HeatmapDataset(ds, cfg, AugmentConfig(), HeatmapConfig(sigma=2.0), train=False)
    item = items[1]
    assert item["image"].shape == (1, 48, 48) and item["image"].min() >= -1
    assert item["heatmaps"].shape == (4, 48, 48) and item["mask"].all()
    points, _ = decode(item["heatmaps"].numpy(), DecoderConfig(name="parabola"))
    back = map_to_original(points, item["to_original"].numpy())
    np.testing.assert_allclose(back, ds[1].landmarks, atol=0.05)   # 0.05 original px


def test_train_items_are_augmented_reproducibly_and_flip_swaps_labels(synthetic):
    cfg, ds = synthetic
    aug = AugmentConfig(rotation_deg=15, flip_prob=1.0)
    a = HeatmapDataset(ds, cfg, aug, HeatmapConfig(sigma=2.0), train=True, seed=3)
    b = HeatmapDataset(ds, cfg, aug, HeatmapConfig(sigma=2.0), train=True, seed=3)
    ia, ib = a[0], b[0]
    assert torch.equal(ia["image"], ib["image"]) and torch.equal(ia["landmarks"], ib["landmarks"])
    # Flipped every time: label 0 (a left point) must still be left of label 1 after the swap.
    landmarks = ia["landmarks"].numpy()
    assert landmarks[0, 0] < landmarks[1, 0]
    # The targets sit on the transformed points.
    points, _ = decode(ia["heatmaps"].numpy(), DecoderConfig(name="parabola"))
    visible = ia["mask"].numpy()
    np.testing.assert_allclose(points[visible], landmarks[visible], atol=0.05)


def test_default_collate_batches_items(synthetic):
    cfg, ds = synthetic
    loader = torch.utils.data.DataLoader(
        HeatmapDataset(ds, cfg, AugmentConfig(), HeatmapConfig(), train=False), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 48, 48) and batch["to_original"].shape == (3, 3, 3)
    assert batch["to_original"].dtype == torch.float64


def test_flip_without_permutation_is_refused(synthetic):
    cfg, ds = synthetic
    no_pairs = ds.subset(ds.ids)
    no_pairs.flip_permutation = None
    with pytest.raises(ValueError, match="permutation"):
        HeatmapDataset(no_pairs, cfg, AugmentConfig(flip_prob=0.5), HeatmapConfig(), train=True)


def test_augmentation_is_a_function_of_seed_epoch_and_item(synthetic):
    """Per-item randomness (data/randomness.py): the same (seed, epoch, item) gives the same
    augmented item whatever was drawn before or by how many workers; another epoch, item or
    seed another one; the copies of a RepeatedDataset are augmented anew."""
    from torch.utils.data import DataLoader

    from ddpm_landmarks.data.randomness import set_data_epoch
    from ddpm_landmarks.training.launch import RepeatedDataset
    cfg, ds = synthetic
    make = lambda seed: HeatmapDataset(ds, cfg, AugmentConfig(), HeatmapConfig(), train=True,  # noqa: E731
                                       seed=seed)
    a, b = make(3), make(3)
    b[4], b[0]                                       # other items drawn first: no effect
    assert torch.equal(a[2]["image"], b[2]["image"])
    assert not torch.equal(a[2]["image"], a[3]["image"][:, :, :])  # another item
    assert not torch.equal(a[2]["image"], make(4)[2]["image"])
    first = a[2]["image"]
    set_data_epoch(a, 1)
    assert not torch.equal(first, a[2]["image"])
    set_data_epoch(a, 0)
    assert torch.equal(first, a[2]["image"])

    def images(workers: int) -> torch.Tensor:
        loader = DataLoader(make(3), batch_size=2, num_workers=workers)
        return torch.cat([batch["image"] for batch in loader])
    assert torch.equal(images(0), images(2))

    repeated = RepeatedDataset(make(3), times=2)
    n = len(ds)
    assert len(repeated) == 2 * n
    assert not torch.equal(repeated[1]["image"], repeated[n + 1]["image"])   # a new copy
    assert torch.equal(repeated[1]["image"], make(3)[1]["image"])
