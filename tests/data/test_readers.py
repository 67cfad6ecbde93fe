"""Dataset readers: the shared real data (skipped when absent) and small broken fixtures."""
from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.data.chest import (
    normalized_to_pixels,
    read_chest_gu2net,
    read_label,
)
from ddpm_landmarks.data.generic import read_landmark_folder
from ddpm_landmarks.data.hand import cv_split, read_hand_dha
from ddpm_landmarks.data.isbi import LANDMARK_NAMES, read_annotation_txt, read_isbi2015
from ddpm_landmarks.data.registry import DATASETS, build_dataset, resolve_root
from ddpm_landmarks.data.sample import stored_to_original
from ddpm_landmarks.data.spine import FLIP_PERMUTATION, read_aasce_spine
from ddpm_landmarks.errors import DataError


def points_csv(path: Path) -> dict[str, np.ndarray]:
    """{image: (K, 2)} straight from an image,landmark_index,x,y file (rows in index order)."""
    out: dict[str, list] = {}
    for row in csv.DictReader(open(path)):
        out.setdefault(row["image"], []).append([float(row["x"]), float(row["y"])])
    return {k: np.array(v) for k, v in out.items()}


def manifest(path: Path) -> dict[str, dict]:
    return {row["image"]: row for row in csv.DictReader(open(path))}


# ------------------------------------------------------------------------------------ ISBI 2015

def test_isbi_csv_layout(shared_data):
    ds = read_isbi2015(shared_data / "isbi2015", "mean")
    assert ds.num_landmarks == 19 and ds.landmark_names == LANDMARK_NAMES
    assert (len(ds.split("train")), len(ds.split("test1"))) == (150, 150)
    assert all(r.spacing_mm == (0.1, 0.1) for r in ds.records) and ds.unit == "mm"
    assert ds.flip_permutation is None and ds.sdr_thresholds_mm == [2.0, 2.5, 3.0, 4.0]
    exact = points_csv(shared_data / "isbi2015/orig_coords/landmarks_mean_orig.csv")
    assert all(np.array_equal(r.landmarks, exact[r.meta["file"]]) for r in ds.records)
    sample = ds[0]
    assert sample.image.shape == (512, 413) and sample.original_size == (1935, 2400)


def test_isbi_challenge_is_senior(shared_data):
    """Evidence behind "challenge = senior" in the raw layout (isbi.py docstring)."""
    senior = read_isbi2015(shared_data / "isbi2015", "senior")
    challenge = read_isbi2015(shared_data / "isbi2015", "challenge")
    assert all(np.array_equal(a.landmarks, b.landmarks)
               for a, b in zip(senior.records, challenge.records))


def test_isbi_resized_to_original_mapping(shared_data):
    """THE half-pixel check: pixel-centre mapping reproduces the exact points, x / scale doesn't."""
    root = shared_data / "isbi2015"
    resized = points_csv(root / "landmarks_mean.csv")
    exact = points_csv(root / "orig_coords/landmarks_mean_orig.csv")
    rows = manifest(root / "manifest.csv")
    worst = naive_worst = 0.0
    for image, pts in resized.items():
        m = rows[image]
        scale = (int(m["new_w"]) / int(m["orig_w"]), int(m["new_h"]) / int(m["orig_h"]))
        worst = max(worst, np.abs(stored_to_original(pts, scale) - exact[image]).max())
        naive_worst = max(naive_worst, np.abs(pts / np.array(scale) - exact[image]).max())
    assert worst * 0.1 < 0.01                   # mm
    assert naive_worst * 0.1 > 0.01             # the pitfall: ~half a coarse pixel off


def test_generic_maps_without_orig_coords(shared_data, tmp_path):
    """Same folder minus orig_coords/: the reader's own mapping lands within 0.01 mm."""
    src = shared_data / "isbi2015"
    (tmp_path / "images").symlink_to(src / "images")
    for name in ("landmarks_mean.csv", "manifest.csv"):
        shutil.copy(src / name, tmp_path / name)
    ds = read_landmark_folder(tmp_path, "landmarks_mean.csv", num_landmarks=19)
    exact = points_csv(src / "orig_coords/landmarks_mean_orig.csv")
    err = max(np.abs(r.landmarks - exact[r.meta["file"]]).max() for r in ds.records)
    assert err * 0.1 < 0.01 and ds.records[0].spacing_mm == (0.1, 0.1)


def write_txt(path: Path, points: np.ndarray, junk=("1", "3")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{int(x)},{int(y)}" for x, y in points] + list(junk)
    path.write_text("\r\n".join(lines) + "\r\n")        # the release's line endings


@pytest.fixture
def isbi_raw(shared_data, tmp_path):
    """Challenge layout for images 001 (train) and 151 (test1), BMPs at the original size."""
    src = shared_data / "isbi2015"
    senior = points_csv(src / "orig_coords/landmarks_senior_orig.csv")
    junior = points_csv(src / "orig_coords/landmarks_junior_orig.csv")
    for num, folder in (("001", "TrainingData"), ("151", "Test1Data")):
        png = cv2.imread(str(src / "images" / f"{num}.png"), cv2.IMREAD_GRAYSCALE)
        out = tmp_path / "RawImage" / folder / f"{num}.bmp"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), cv2.resize(png, (1935, 2400)))
        write_txt(tmp_path / f"AnnotationsByMD/400_senior/{num}.txt", senior[f"{num}.png"])
        write_txt(tmp_path / f"AnnotationsByMD/400_junior/{num}.txt", junior[f"{num}.png"])
    return tmp_path, senior, junior


def test_isbi_raw_layout(isbi_raw, shared_data):
    root, senior, junior = isbi_raw
    ds = read_isbi2015(root, "mean")
    assert ds.ids == ["001", "151"] and [r.split for r in ds.records] == ["train", "test1"]
    exact = points_csv(shared_data / "isbi2015/orig_coords/landmarks_mean_orig.csv")
    for r in ds.records:
        assert np.allclose(r.landmarks, (senior[r.id + ".png"] + junior[r.id + ".png"]) / 2)
        assert np.allclose(r.landmarks, exact[r.id + ".png"])
        assert r.spacing_mm == (0.1, 0.1) and r.original_size is None
    assert ds[0].image.shape == (2400, 1935)
    for gt, ref in (("senior", senior), ("challenge", senior), ("junior", junior)):
        one = read_isbi2015(root, gt)
        assert np.array_equal(one.records[0].landmarks, ref["001.png"])


@pytest.mark.parametrize("edit, line", [
    (lambda lines: lines[:18] + lines[19:], "line 19"),             # 18 points, then junk
    (lambda lines: lines[:18], "line 19"),                           # file ends too early
    (lambda lines: lines[:4] + ["100,abc"] + lines[5:], "line 5"),   # non-numeric
    (lambda lines: lines[:6] + ["1,2,3"] + lines[7:], "line 7"),     # wrong number of fields
])
def test_isbi_bad_annotation(isbi_raw, edit, line):
    root = isbi_raw[0]
    txt = root / "AnnotationsByMD/400_senior/151.txt"
    txt.write_text("\n".join(edit(txt.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=f"151.txt {line}"):
        read_annotation_txt(txt)
    with pytest.raises(DataError, match=f"151.txt {line}"):
        read_isbi2015(root, "mean")
    ds = read_isbi2015(root, "junior")       # only the senior file is broken
    assert len(ds) == 2


def test_isbi_raw_skip_missing_annotation(isbi_raw, caplog):
    root = isbi_raw[0]
    (root / "AnnotationsByMD/400_junior/001.txt").unlink()
    with pytest.raises(DataError, match="001.txt"):
        read_isbi2015(root, "mean")
    with caplog.at_level(logging.WARNING):
        ds = read_isbi2015(root, "mean", on_bad="skip")
    assert ds.ids == ["151"] and len(ds.skipped) == 1 and "skipped 1 image" in caplog.text


# ----------------------------------------------------------------------------- spine, hand

def test_spine(shared_data):
    ds = read_aasce_spine(shared_data / "aasce2019_spine")
    assert ds.num_landmarks == 68 and ds.unit == "px"
    assert (len(ds.split("training")), len(ds.split("test"))) == (481, 128)
    assert len(ds.unlabeled) == 98 and all(r.spacing_mm is None for r in ds.records)
    # The permutation swaps exactly the left/right words of landmark_names.csv.
    names = [row["name"] for row in csv.DictReader(open(shared_data /
                                                         "aasce2019_spine/landmark_names.csv"))]
    mirrored = [n.replace("-left", "-@").replace("-right", "-left").replace("-@", "-right")
                for n in names]
    assert [names[j] for j in FLIP_PERMUTATION] == mirrored


def test_hand(shared_data):
    root = shared_data / "hand_dha"
    ds = read_hand_dha(root)
    assert len(ds) == 9 and ds.num_landmarks == 37 and len(ds.absent_ids) == 901
    assert ds.sdr_thresholds_mm == [2.0, 4.0, 10.0]
    rows = manifest(root / "manifest.csv")
    exact = points_csv(root / "orig_coords/landmarks_orig.csv")
    for r in ds.records:
        m = rows[r.id + ".png"]
        assert r.spacing_mm[0] == r.spacing_mm[1]
        # The wrist rule (landmarks 1 and 5, 0-based) against the manifest column (5 decimals
        # printed, so 1e-4 relative) and against the ElementSpacing of Payer's .mha file.
        column = float(m["mm_per_orig_px_wrist50"])
        assert abs(r.spacing_mm[0] - column) / column < 1e-4, (r.id, r.spacing_mm, column)
        element = float(re.search(r"ElementSpacing=([0-9.]+)", m["note"]).group(1))
        assert abs(r.spacing_mm[0] - element) / element < 1e-4, (r.id, r.spacing_mm, element)
        assert r.original_size == (int(m["orig_w"]), int(m["orig_h"]))
        assert np.array_equal(r.landmarks, exact[r.id + ".png"])
    assert sorted(ds.split("cv1_test").ids) == ["3231", "7081", "7088", "7232"]
    assert sorted(cv_split(ds, "cv2_test").ids) == ["3177", "7236"]
    cfg = DataConfig(dataset="hand_dha", root=str(root), train_split="cv3_train",
                     eval_split="cv3_test")
    assert sorted(build_dataset(cfg).split("cv3_test").ids) == ["3167", "3229", "5245"]


# ------------------------------------------------------------------------------------ chest

def chest_fixture(shared_data, tmp_path, n=3) -> Path:
    labels = sorted((shared_data / "chest_shenzhen_labels/chest/labels").glob("*.txt"))[:n]
    (tmp_path / "labels").mkdir()
    (tmp_path / "pngs").mkdir()
    for i, label in enumerate(labels):
        shutil.copy(label, tmp_path / "labels" / label.name)
        image = np.full((30 + i, 40 + 2 * i), 128, np.uint8)        # sizes differ per image
        cv2.imwrite(str(tmp_path / "pngs" / f"{label.stem}.png"), image)
    return tmp_path


def test_chest(shared_data, tmp_path):
    all_labels = sorted((shared_data / "chest_shenzhen_labels/chest/labels").glob("*.txt"))
    assert len(all_labels) == 279 and all(read_label(p).shape == (6, 2) for p in all_labels)
    root = chest_fixture(shared_data, tmp_path)
    ds = read_chest_gu2net(root)
    assert len(ds) == 3 and ds.unit == "px@512x512" and ds.reference_size == (512, 512)
    r = ds.records[1]
    uv = read_label(root / "labels" / f"{r.id}.txt")
    assert np.allclose(r.landmarks, uv * [42, 31] - 0.5)
    assert np.allclose(normalized_to_pixels([[0, 1]], (42, 31)), [[-0.5, 30.5]])
    assert r.spacing_mm is None and ds[1].image.shape == (31, 42)


@pytest.mark.parametrize("text, line", [
    ("5\n" + "0.5 0.5\n" * 6, "line 7"),         # count says 5, 6 follow
    ("6\n" + "0.5 0.5\n" * 5, "line 7"),         # count says 6, 5 follow
    ("7\n" + "0.5 0.5\n" * 7, "line 1"),         # consistent, but not 6 landmarks
    ("six\n" + "0.5 0.5\n" * 6, "line 1"),
    ("6\n" + "0.5 0.5\n" * 2 + "0.5 x\n" + "0.5 0.5\n" * 3, "line 4"),
])
def test_chest_bad_label(shared_data, tmp_path, text, line):
    root = chest_fixture(shared_data, tmp_path)
    bad = sorted((root / "labels").glob("*.txt"))[0]
    bad.write_text(text)
    with pytest.raises(DataError, match=f"{bad.name} {line}"):
        read_chest_gu2net(root)
    assert len(read_chest_gu2net(root, on_bad="skip")) == 2


def test_chest_label_without_image(shared_data, tmp_path):
    root = chest_fixture(shared_data, tmp_path)
    next((root / "pngs").iterdir()).unlink()
    with pytest.raises(DataError, match="no image"):
        read_chest_gu2net(root)
    ds = read_chest_gu2net(root, on_bad="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1


# ------------------------------------------------------------------ generic layout, bad input

@pytest.fixture
def generic(tmp_path) -> Path:
    """3 images of 20 x 10 px, 2 landmarks each, a manifest with spacing and splits."""
    (tmp_path / "images").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"images/im{i}.png"), np.zeros((10, 20), np.uint8))
    rows = ["image,landmark_index,x,y"] + [f"im{i}.png,{k},{3 + k},{4 + i}"
                                           for i in range(3) for k in range(2)]
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "manifest.csv").write_text(
        "image,spacing_mm,split\nim0.png,0.2,train\nim1.png,0.2,train\nim2.png,0.2,test\n")
    return tmp_path


def edit_line(path: Path, line: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1:line] = [] if text is None else [text]
    path.write_text("\n".join(lines) + "\n")


def test_generic_ok(generic):
    edit_line(generic / "landmarks.csv", 3, "im0.png,1,,")          # a missing landmark
    ds = read_landmark_folder(generic)
    assert ds.ids == ["im0", "im1", "im2"] and ds.num_landmarks == 2 and ds.unit == "mm"
    assert np.isnan(ds.records[0].landmarks[1]).all() and ds.records[0].spacing_mm == (0.2, 0.2)
    assert len(ds.split("test")) == 1 and ds.skipped == [] and ds.unlabeled == []


@pytest.mark.parametrize("where, line, text, match", [
    ("landmarks.csv", 4, "im1.png,0,abc,4", "landmarks.csv line 4: non-numeric"),
    ("landmarks.csv", 4, "im1.png,5,3,4", "landmarks.csv line 4: landmark index 5 out of range"),
    ("landmarks.csv", 5, "im1.png,0,3,5", "landmarks.csv line 5: duplicate row .* line 4"),
    ("landmarks.csv", 5, None, "landmarks.csv line 4: image im1.png has 1 landmark rows"),
    ("landmarks.csv", 4, "im1.png,0,3", "landmarks.csv line 4: expected 4 fields"),
    ("manifest.csv", 3, "im1.png,0.2,train\nim9.png,0.2,train", "manifest.csv line 4: image file"),
    ("manifest.csv", 3, None, "landmarks.csv line 4: image im1.png has no row in"),
])
def test_generic_bad_input(generic, caplog, where, line, text, match):
    edit_line(generic / where, line, text)
    with pytest.raises(DataError, match=match):
        read_landmark_folder(generic, num_landmarks=2)
    with caplog.at_level(logging.WARNING):
        ds = read_landmark_folder(generic, num_landmarks=2, on_bad="skip")
    assert "im0" in ds.ids and len(ds.skipped) == 1 and "skipped 1 image" in caplog.text


def test_generic_missing_and_corrupt_image(generic):
    (generic / "images/im1.png").unlink()
    with pytest.raises(DataError, match="landmarks.csv line 4: image file not found"):
        read_landmark_folder(generic)
    (generic / "images/im1.png").write_bytes(b"not a png at all")    # corrupt: fails at load
    ds = read_landmark_folder(generic)
    with pytest.raises(DataError, match="im1.png"):
        ds[1]


def test_generic_resampled_and_spacing_columns(generic):
    (generic / "manifest.csv").write_text(
        "image,orig_w,orig_h,orig_spacing_mm,split\nim0.png,40,20,unknown,train\n"
        "im1.png,40,20,unknown,train\nim2.png,40,20,unknown,test\nextra.png,40,20,unknown,u\n")
    cv2.imwrite(str(generic / "images/extra.png"), np.zeros((10, 20), np.uint8))
    ds = read_landmark_folder(generic)
    assert ds.unit == "px" and ds.records[0].spacing_mm is None and ds.unlabeled == ["extra.png"]
    assert np.allclose(ds.records[0].landmarks[0], [(3 + 0.5) * 2 - 0.5, (4 + 0.5) * 2 - 0.5])
    (generic / "manifest.csv").write_text(
        "image,spacing_mm_x,spacing_mm_y\nim0.png,0.1,0.2\nim1.png,0.1,0.2\nim2.png,0.1,0.2\n")
    assert read_landmark_folder(generic).records[2].spacing_mm == (0.1, 0.2)


# ----------------------------------------------------------------------------------- registry

def test_registry(generic, tmp_path, monkeypatch):
    assert set(DATASETS) == {"isbi2015", "hand_dha", "chest_gu2net", "aasce_spine", "generic",
                             "synthetic"}
    with pytest.raises(DataError, match="valid: isbi2015"):
        build_dataset(DataConfig(dataset="nope"))
    assert len(build_dataset(DataConfig(dataset="generic", root=str(generic)))) == 3
    with pytest.raises(DataError, match="line 2: image im0.png has 2 landmark rows, expected 5"):
        build_dataset(DataConfig(dataset="generic", root=str(generic), num_landmarks=5))
    monkeypatch.setitem(DATASETS, "fixed", lambda cfg: read_landmark_folder(generic))
    with pytest.raises(DataError, match="num_landmarks is 5 but the dataset has 2"):
        build_dataset(DataConfig(dataset="fixed", num_landmarks=5))
    monkeypatch.setenv("DDPM_LANDMARKS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere/isbi2015.*DDPM_LANDMARKS_DATA"):
        build_dataset(DataConfig(dataset="isbi2015"))
    monkeypatch.setenv("MY_DATA", str(generic.parent))
    cfg = DataConfig(dataset="generic", root=f"$MY_DATA/{generic.name}")
    assert resolve_root(cfg, "") == generic
    monkeypatch.delenv("DDPM_LANDMARKS_DATA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/aasce2019_spine").mkdir(parents=True)
    assert resolve_root(DataConfig(dataset="aasce_spine"), "aasce2019_spine") == \
        Path("data/aasce2019_spine")


def test_hand_small_fixture(tmp_path):
    """Absent images are counted, not errors; the wrist rule; bad rows name their line."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for ident in ("11", "12", "13"):
        pts = rng.uniform(0, 50, (37, 2)).round(1)
        rows.append(",".join([ident] + [f"{v:g}" for v in pts.ravel()]))
        if ident != "13":
            cv2.imwrite(str(tmp_path / f"images/{ident}.png"), np.zeros((60, 50), np.uint8))
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    ds = read_hand_dha(tmp_path)
    assert ds.ids == ["11", "12"] and ds.absent_ids == ["13"] and ds.splits == [""]
    p = ds.records[0].landmarks
    assert np.isclose(ds.records[0].spacing_mm[0], 50 / np.hypot(*(p[1] - p[5])))
    assert np.isclose(read_hand_dha(tmp_path, wrist_landmarks=(0, 4)).records[0].spacing_mm[0],
                      50 / np.hypot(*(p[0] - p[4])))            # the pair stays configurable
    edit_line(tmp_path / "all.csv", 2, rows[1].rsplit(",", 1)[0])          # 74 fields
    with pytest.raises(DataError, match="all.csv line 2: expected id \\+ 74 coordinates"):
        read_hand_dha(tmp_path)
    edit_line(tmp_path / "all.csv", 2, rows[1].replace(",", ",x", 1))      # non-numeric
    with pytest.raises(DataError, match="all.csv line 2: non-numeric"):
        read_hand_dha(tmp_path)
    assert read_hand_dha(tmp_path, on_bad="skip").ids == ["11"]
    edit_line(tmp_path / "all.csv", 2, rows[1])
    (tmp_path / "manifest.csv").write_text("image,orig_w,orig_h\n11.png,100,120\n99.png,1,1\n")
    with pytest.raises(DataError, match="manifest.csv line 3: image file not found"):
        read_hand_dha(tmp_path)
