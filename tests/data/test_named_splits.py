"""Named splits (data/named_splits.py): ISBI Test2 and "test" = Test1 + Test2, the released
code's first-N splits of ISBI / hand / chest with the chest exclusion list."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.data.named_splits import RELEASED_CHEST_EXCLUDED, first_n_splits
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.errors import DataError


def test_first_n_splits_by_hand():
    ids = ["e", "a", "d", "c", "b", "x"]
    out = first_n_splits(ids, [("tr", 2), ("va", 1)], rest="te", exclude=["x"])
    assert out == {"tr": ["a", "b"], "va": ["c"], "te": ["d", "e"]}   # sorted, x dropped
    short = first_n_splits(ids[:2], [("tr", 2), ("va", 1)], rest="te")
    assert short["tr"] == ["a", "e"]
    assert "sorted images 3-3" in short["va"] and "has 2 images" in short["va"]
    assert "after the first 3" in short["te"]


def write_isbi_raw(root: Path, numbers, folder_of) -> None:
    """Challenge layout with tiny BMPs (the reader does not need the 1935 x 2400 size)."""
    rng = np.random.default_rng(0)
    for num in numbers:
        stem = f"{num:03d}"
        image = root / "RawImage" / folder_of(num) / f"{stem}.bmp"
        image.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), np.zeros((12, 10), np.uint8))
        for who in ("400_senior", "400_junior"):
            txt = root / "AnnotationsByMD" / who / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            points = rng.integers(0, 10, (19, 2))
            txt.write_text("\n".join(f"{x},{y}" for x, y in points) + "\n1\n")


def folder(num: int) -> str:
    return "TrainingData" if num <= 150 else "Test1Data" if num <= 300 else "Test2Data"


def test_isbi_test2_and_the_combined_test_split(tmp_path):
    write_isbi_raw(tmp_path, list(range(1, 151)) + [151, 152, 301, 302], folder)
    ds = build_dataset(DataConfig(dataset="isbi2015", root=str(tmp_path)))
    assert [r.split for r in ds.records[-4:]] == ["test1", "test1", "test2", "test2"]
    assert ds.split("test2").ids == ["301", "302"]
    assert ds.split("test").ids == ["151", "152", "301", "302"]
    assert ds.split("released_train").ids == [f"{i:03d}" for i in range(1, 131)]
    assert ds.split("released_val").ids == [f"{i:03d}" for i in range(131, 151)]
    assert {"test", "test1", "test2", "released_train", "released_val"} <= set(ds.splits)


def test_isbi_test_without_test2_is_an_error_that_says_so(tmp_path):
    write_isbi_raw(tmp_path, [1, 2, 151], folder)
    ds = build_dataset(DataConfig(dataset="isbi2015", root=str(tmp_path)))
    assert "test" not in ds.splits and ds.split("test1").ids == ["151"]
    with pytest.raises(DataError, match="Test1 \\+ Test2.*test2 is not in.*Test2Data"):
        ds.split("test")
    with pytest.raises(DataError, match="sorted images 1-130.*has 2 images"):
        ds.split("released_train")              # a partial Train cannot give the released split


def test_chest_released_split_excludes_the_nine_ids(tmp_path):
    """279 GU2Net-style labels, the 9 excluded ids among them: 270 kept, 195 / 34 / 41."""
    (tmp_path / "labels").mkdir()
    (tmp_path / "pngs").mkdir()
    others = [s for i in range(1, 300) if (s := f"CHNCXR_{i:04d}_0") not in
              RELEASED_CHEST_EXCLUDED][:270]
    for stem in others + list(RELEASED_CHEST_EXCLUDED):
        (tmp_path / "labels" / f"{stem}.txt").write_text("6\n" + "0.5 0.5\n" * 6)
        cv2.imwrite(str(tmp_path / "pngs" / f"{stem}.png"), np.zeros((4, 4), np.uint8))
    ds = build_dataset(DataConfig(dataset="chest_gu2net", root=str(tmp_path)))
    parts = {n: ds.split(f"released_{n}").ids for n in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [195, 34, 41]
    kept = sorted(set(ds.ids) - set(RELEASED_CHEST_EXCLUDED))
    assert parts["train"] + parts["val"] + parts["test"] == kept
    assert len(ds) == 279 and kept == sorted(others)
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [195, 34, 50]   # GU2Net's


def test_hand_released_split_needs_610_images(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for ident in ("12", "3", "7"):
        rows.append(",".join([ident] + [str(v) for v in range(74)]))
        cv2.imwrite(str(tmp_path / f"images/{ident}.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(DataConfig(dataset="hand_dha", root=str(tmp_path)))
    with pytest.raises(DataError, match="sorted images 1-550.*has 3 images"):
        ds.split("released_train")
    with pytest.raises(DataError, match="after the first 609"):
        ds.split("released_test")
    assert first_n_splits(ds.ids, [("a", 2)], rest="b") == {"a": ["12", "3"], "b": ["7"]}
