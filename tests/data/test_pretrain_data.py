"""Pretraining images: pools + labelled splits, exclusions, audit lists, augmentation seeding."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    PoolConfig,
    UnlabeledConfig,
)
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.pretrain_data import (
    PretrainImages,
    pool_slots,
    pool_weighted_subset,
)
from ddpm_landmarks.data.pretrain_sets import (
    EXCLUSION_REPORT,
    IMAGE_LIST,
    build_pretrain_dataset,
)
from ddpm_landmarks.data.randomness import set_data_epoch
from ddpm_landmarks.errors import ConfigError, DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
S = 32


def write_png(path: Path, shape=(40, 30), dtype=np.uint8, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    top = np.iinfo(dtype).max
    image = np.random.default_rng(seed).integers(0, top, size=shape, dtype=np.int64)
    assert cv2.imwrite(str(path), image.astype(dtype))
    return path


@pytest.fixture
def pools(tmp_path):
    """Pool a: 3 images (8-bit and 16-bit, non-square); pool b: 1 image."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_png(a / "001.png", (40, 30), np.uint8, 1)
    write_png(a / "002.png", (25, 50), np.uint16, 2)
    write_png(a / "003.png", (64, 64), np.uint8, 3)
    write_png(b / "101.png", (20, 20), np.uint16, 4)
    return a, b


def make_cfg(pools=(), weights=None, exclude=(), labelled=(), data=None) -> PretrainConfig:
    weights = weights or [1.0] * len(pools)
    return PretrainConfig(
        data=data or DataConfig(image_size=S),
        unlabeled=UnlabeledConfig(pools=[PoolConfig(path=str(p), weight=w)
                                         for p, w in zip(pools, weights)],
                                  exclude=list(exclude), labelled_splits=list(labelled)))


def listed(run_dir: Path) -> list[str]:
    lines = (run_dir / IMAGE_LIST).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_items_shape_range_and_audit_files(pools, tmp_path):
    run_dir = tmp_path / "run"
    dataset = build_pretrain_dataset(make_cfg(pools), run_dir)
    assert len(dataset) == 4
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (1, S, S) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0
    assert listed(run_dir) == [str(p) for p in dataset.paths]
    assert "4 kept" in (run_dir / EXCLUSION_REPORT).read_text()


def test_letterbox_pads_with_black_and_no_augment_is_deterministic(pools):
    cfg = make_cfg(pools)
    dataset = PretrainImages(build_pretrain_dataset(cfg).pools, S, "letterbox", augment=None)
    x = dataset[1]                       # 50 wide x 25 high: bands above and below
    assert torch.all(x[0, 0] == -1.0) and torch.all(x[0, -1] == -1.0)
    assert torch.equal(dataset[1], x)


def test_augmentation_depends_on_seed_epoch_and_item_only(pools):
    cfg = make_cfg(pools)
    one, two = build_pretrain_dataset(cfg, seed=5), build_pretrain_dataset(cfg, seed=5)
    first = [one[i] for i in range(4)]
    assert all(torch.equal(a, two[i]) for i, a in enumerate(first))
    assert torch.equal(two[3], first[3]) and torch.equal(two[0], first[0])   # any order
    assert not torch.equal(build_pretrain_dataset(cfg, seed=6)[0], first[0])
    set_data_epoch(one, 1)
    assert not torch.equal(one[0], first[0])
    set_data_epoch(one, 0)
    assert torch.equal(one[0], first[0])


def test_flips_refused(pools):
    cfg = make_cfg(pools)
    cfg.augment = AugmentConfig(flip_prob=0.5)
    with pytest.raises(ConfigError, match="flip"):
        build_pretrain_dataset(cfg)


def test_workers_and_loader_seeds_do_not_change_the_batches(pools):
    """Per-item randomness: 0 or 2 workers, any loader generator, give the same batches (so a
    resumed run, which skips batches, replays the interrupted one's augmentations)."""
    dataset = build_pretrain_dataset(make_cfg(pools))

    def batches(workers: int, seed: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(loader))

    a = batches(0, 1)
    assert torch.equal(a, batches(2, 1)) and torch.equal(a, batches(2, 7))
    set_data_epoch(dataset, 1)                       # the engine does this before each epoch
    assert not torch.equal(a, batches(2, 1))


def test_pool_weighted_subset(pools):
    dataset = build_pretrain_dataset(make_cfg(pools, weights=[1.0, 3.0]))
    subset = pool_weighted_subset(dataset, epoch_size=12, seed=0)
    assert sorted(subset.indices) == [0, 1, 2] + [3] * 9       # 1/4 and 3/4 of the slots
    assert subset.indices == pool_weighted_subset(dataset, epoch_size=12, seed=0).indices
    small = sorted(pool_weighted_subset(dataset, epoch_size=2).indices)   # 0.5 / 1.5 slots
    assert small[0] in (0, 1, 2) and small[1] == 3
    assert subset[0].shape == (1, S, S)


def test_pool_slots_follow_the_pool_weights_whatever_the_pool_sizes(pools):
    """pool_slots: pool p gets round(size * w_p / sum w) slots (largest remainder), each pool
    cycled through a seeded permutation of its images: a small heavy pool repeats."""
    dataset = build_pretrain_dataset(make_cfg(pools, weights=[1.0, 3.0]))    # 3 + 1 images
    slots = pool_slots(dataset.pools.pools, 4000, np.random.default_rng(0))
    assert len(slots) == 4000 and (slots == 3).sum() == 3000          # 3/4 of the epoch
    assert sorted(np.bincount(slots[slots < 3]).tolist()) == [333, 333, 334]
    np.testing.assert_array_equal(slots, pool_slots(dataset.pools.pools, 4000,
                                                    np.random.default_rng(0)))
    odd = pool_slots(dataset.pools.pools, 7, np.random.default_rng(1))  # 1.75 / 5.25 slots
    assert (odd == 3).sum() == 5 and len(odd) == 7


def test_exclusion_enforced_and_listed(pools, tmp_path):
    run_dir = tmp_path / "run"
    dataset = build_pretrain_dataset(make_cfg(pools, exclude=["002"]), run_dir)
    names = [Path(p).name for p in listed(run_dir)]
    assert names == ["001.png", "003.png", "101.png"] and len(dataset) == 3
    assert "'002': 1" in (run_dir / EXCLUSION_REPORT).read_text()


def test_labelled_splits_of_synthetic_dataset(tmp_path, pools):
    data = DataConfig(dataset="synthetic", root=str(tmp_path / "syn"), image_size=S,
                      synthetic_num_images=6, synthetic_image_size=64, synthetic_num_landmarks=4)
    run_dir = tmp_path / "run"
    # split only: the 4 train images (test1 = the last third: 0004, 0005)
    dataset = build_pretrain_dataset(make_cfg(labelled=["train"], data=data), run_dir)
    assert [Path(p).name for p in listed(run_dir)] == [f"000{i}.png" for i in range(4)]
    assert dataset[0].shape == (1, S, S)
    # plus a folder pool, with one train image excluded by id
    dataset = build_pretrain_dataset(make_cfg([pools[1]], labelled=["train"], exclude=["0001"],
                                              data=data), run_dir)
    assert [Path(p).name for p in listed(run_dir)] == ["101.png", "0000.png", "0002.png",
                                                       "0003.png"]
    assert [p.name for p in dataset.pools.pools] == ["b", "synthetic:train"]
    # a labelled split that is entirely excluded is an error, not an empty pool
    with pytest.raises(DataError, match="excluded"):
        build_pretrain_dataset(make_cfg(labelled=["test1"], exclude=["0004", "0005"], data=data))


def test_empty_configuration_and_empty_pool(tmp_path):
    with pytest.raises(DataError, match="labelled_splits"):
        build_pretrain_dataset(make_cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_pretrain_dataset(make_cfg([tmp_path / "empty"]))


def test_corrupt_image_names_the_file(pools):
    bad = pools[1] / "102.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = build_pretrain_dataset(make_cfg(pools))
    index = [p.name for p in dataset.paths].index("102.png")
    with pytest.raises(DataError, match="102.png"):
        dataset[index]


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs" / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_pretrain_configs_load(path):
    cfg = load_config(path, cls=PretrainConfig)
    assert cfg.augment.flip_prob == 0
    assert cfg.unlabeled.pools or cfg.unlabeled.labelled_splits


def test_real_xrays_pool_without_test1(shared_data, tmp_path):
    cfg = make_cfg([shared_data / "chest_unlabeled", shared_data / "isbi2015"],
                   exclude=[f"isbi2015:test1@{shared_data / 'isbi2015'}"])
    run_dir = tmp_path / "run"
    dataset = build_pretrain_dataset(cfg, run_dir)
    names = {Path(p).name for p in listed(run_dir)}
    assert len(dataset) == 1275 + 150
    assert "001.png" in names and "150.png" in names
    assert not {f"{i:03d}.png" for i in range(151, 301)} & names
    x = dataset[len(dataset) - 1]
    assert x.shape == (1, S, S) and -1 <= x.min() and x.max() <= 1
