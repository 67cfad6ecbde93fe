"""Unlabelled pretraining pools: discovery, weighted mixing, seeding, exclusions, audit list."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_dicom import write_dicom

from ddpm_landmarks.config.common import PoolConfig, UnlabeledConfig
from ddpm_landmarks.data.unlabeled import (
    MixedPools,
    UnlabeledPool,
    build_pools,
    find_images,
    image_id,
    image_list_text,
)
from ddpm_landmarks.errors import ConfigError, DataError


def png(path: Path, value: int = 100, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((8, 10), value, dtype=dtype))
    return path


@pytest.fixture
def folders(tmp_path):
    """Pool a: 3 images (8-bit, 16-bit nested, DICOM nested twice); pool b: 1 image."""
    a, b = tmp_path / "a", tmp_path / "b"
    png(a / "001.png", 51)
    png(a / "sub" / "002.PNG", 65535 // 5, np.uint16)
    (a / "sub" / "deeper").mkdir(parents=True)
    write_dicom(a / "sub" / "deeper" / "003.dcm", np.arange(80, dtype=np.uint16).reshape(8, 10))
    (a / "notes.txt").write_text("not an image")
    png(a / ".hidden" / "999.png")
    png(b / "x" / "101.jpg", 200)
    return a, b


def test_find_images_recursive_sorted_case_insensitive(folders):
    a, _ = folders
    found = find_images(a)
    assert [p.name for p in found] == ["001.png", "002.PNG", "003.dcm"]
    assert found == sorted(found)


def test_find_images_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        find_images(tmp_path / "nowhere")


def test_empty_or_missing_pool_is_an_error(tmp_path, folders):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(tmp_path / "empty"))]))
    with pytest.raises(DataError, match="missing"):
        build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(tmp_path / "missing"))]))
    with pytest.raises(ConfigError):
        build_pools(UnlabeledConfig(pools=[]))
    with pytest.raises(ConfigError, match="weight"):
        build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(folders[0]), weight=0.0)]))


def test_items_len_and_getitem(folders):
    a, b = folders
    pools = build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(a), name="A"),
                                               PoolConfig(path=str(b))]))
    assert len(pools) == 4
    assert [(name, p.name) for name, p in pools.items()] == [
        ("A", "001.png"), ("A", "002.PNG"), ("A", "003.dcm"), ("b", "101.jpg")]
    images = [pools[i] for i in range(len(pools))]
    assert all(im.dtype == np.float32 and im.ndim == 2 for im in images)
    assert images[0][0, 0] == pytest.approx(51 / 255)        # 8-bit
    # 16-bit, max 13107: by 2^14 - 1, the smallest full scale holding it (image_io)
    assert images[1][0, 0] == pytest.approx(13107 / 16383)
    # DICOM of 16 stored bits without a window: by its BitsStored range
    assert images[2].min() == 0.0 and images[2].max() == pytest.approx(79 / 65535)
    assert pools.report.found == 4 and pools.report.kept == 4


def test_mixing_proportions_and_seed(folders):
    """The weights of build_pools' pools drive pretraining's epoch mix (pretrain_data.pool_slots):
    pool a (3 images, weight 3) fills 3/4 of an epoch, each of its images equally often."""
    from ddpm_landmarks.data.pretrain_data import pool_slots
    a, b = folders
    pools = build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(a), weight=3.0),
                                               PoolConfig(path=str(b), weight=1.0)]))
    assert [len(p) for p in pools.pools] == [3, 1]
    slots = pool_slots(pools.pools, 4000, np.random.default_rng(7))
    assert (slots < 3).sum() == 3000                      # indices 0..2 are pool a
    assert sorted(np.bincount(slots, minlength=4)[:3].tolist()) == [1000, 1000, 1000]
    np.testing.assert_array_equal(slots, pool_slots(pools.pools, 4000, np.random.default_rng(7)))
    assert not np.array_equal(slots, pool_slots(pools.pools, 4000, np.random.default_rng(8)))


def test_exclusion_by_bare_id_and_id_file(folders, tmp_path, caplog):
    a, b = folders
    id_file = tmp_path / "lists" / "test_ids.txt"
    id_file.parent.mkdir()
    id_file.write_text("# test split\n\n003.dcm\n../b/x/101.jpg\n")
    cfg = UnlabeledConfig(pools=[PoolConfig(path=str(a)), PoolConfig(path=str(b))],
                          exclude=["001", str(id_file), "typo_id"])
    with caplog.at_level(logging.WARNING, logger="ddpm_landmarks.data.unlabeled"):
        with pytest.raises(DataError, match="all 1 images excluded"):
            build_pools(cfg)
    cfg.pools = [PoolConfig(path=str(a))]
    with caplog.at_level(logging.WARNING, logger="ddpm_landmarks.data.unlabeled"):
        pools = build_pools(cfg)
    assert [p.name for p in pools.paths] == ["002.PNG"]
    assert pools.report.per_rule == {"001": 1, str(id_file): 1, "typo_id": 0}
    assert pools.report.excluded == 2
    assert "typo_id" in caplog.text and "matched no" in caplog.text


def test_missing_exclusion_file_is_an_error(folders, tmp_path):
    cfg = UnlabeledConfig(pools=[PoolConfig(path=str(folders[0]))],
                          exclude=[str(tmp_path / "no_such_list.txt")])
    with pytest.raises(DataError, match="no_such_list"):
        build_pools(cfg)


def test_image_list_is_written_and_reads_back_as_exclusion(folders, tmp_path):
    a, b = folders
    cfg = UnlabeledConfig(pools=[PoolConfig(path=str(a)), PoolConfig(path=str(b))])
    pools = build_pools(cfg)
    out = tmp_path / "pretrain_images.txt"
    out.write_text(image_list_text(pools.paths[:2]))
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert lines == [str(p) for p in pools.paths[:2]]
    assert all(Path(ln).is_absolute() for ln in lines)
    cfg.exclude = [str(out)]
    again = build_pools(cfg)
    assert [p.name for p in again.paths] == ["003.dcm", "101.jpg"]
    assert again.report.per_rule == {str(out): 2}


def test_duplicate_images_across_pools_kept_once(folders, caplog):
    a, _ = folders
    cfg = UnlabeledConfig(pools=[PoolConfig(path=str(a / "sub"), name="sub"),
                                 PoolConfig(path=str(a), name="all")])
    with caplog.at_level(logging.WARNING, logger="ddpm_landmarks.data.unlabeled"):
        pools = build_pools(cfg)
    assert [(n, p.name) for n, p in pools.items()] == [
        ("sub", "002.PNG"), ("sub", "003.dcm"), ("all", "001.png")]
    assert "already in an earlier pool" in caplog.text
    cfg.pools.reverse()
    with pytest.raises(DataError, match="'sub'.*already in earlier pools"):
        build_pools(cfg)


def test_image_id():
    assert image_id("/x/151.png") == "151"
    assert image_id("/x/1.2.840.5") == "1.2.840.5"
    assert image_id("/x/scan.v2.dcm") == "scan.v2"


def test_mixed_pools_direct_construction(tmp_path):
    p = png(tmp_path / "1.png")
    pools = MixedPools([UnlabeledPool("only", tmp_path, [p], 2.0)])
    assert len(pools) == 1 and pools.path(0) == p and pools.paths == [p]
    assert pools[0].shape == (8, 10)


def test_exclude_dataset_split_through_the_registry(tmp_path):
    """dataset:split@root resolves through the real registry (a generic dataset made here)."""
    root = tmp_path / "labelled"
    for name in ("001", "002", "003"):
        png(root / "images" / f"{name}.png")
    (root / "landmarks.csv").write_text(
        "image,landmark_index,x,y\n001.png,0,1,1\n002.png,0,2,2\n003.png,0,3,3\n")
    (root / "manifest.csv").write_text(
        "image,split\n001.png,train\n002.png,test1\n003.png,test1\n")
    pools = build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(root / "images"))],
                                        exclude=[f"generic:test1@{root}"]))
    assert [p.name for p in pools.paths] == ["001.png"]
    assert pools.report.per_rule == {f"generic:test1@{root}": 2}
    with pytest.raises(DataError, match="generic:nosuch"):
        build_pools(UnlabeledConfig(pools=[PoolConfig(path=str(root / "images"))],
                                    exclude=[f"generic:nosuch@{root}"]))


def test_exclude_isbi_test1_split(shared_data):
    isbi = shared_data / "isbi2015"
    cfg = UnlabeledConfig(pools=[PoolConfig(path=str(isbi / "images"))],
                          exclude=[f"isbi2015:test1@{isbi}"])
    pools = build_pools(cfg)
    ids = {image_id(p) for p in pools.paths}
    assert len(pools) == 150
    assert not ids & {f"{i:03d}" for i in range(151, 301)}
    assert ids == {f"{i:03d}" for i in range(1, 151)}
    assert pools.report.per_rule == {f"isbi2015:test1@{isbi}": 150}
