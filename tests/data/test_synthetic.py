"""The built-in synthetic dataset: seeded, written in the generic layout, landmarks on anatomy."""
import hashlib

import numpy as np
import pytest

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.synthetic import (
    SyntheticSpec,
    flip_permutation,
    generate,
    mean_shape,
    render_image,
    sample_shape,
)


def _digest(folder):
    h = hashlib.sha1()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    spec = SyntheticSpec(num_images=6, image_size=64, num_landmarks=4, seed=3)
    a = generate(tmp_path / "a", spec)
    b = generate(tmp_path / "b", spec)
    c = generate(tmp_path / "c", SyntheticSpec(num_images=6, image_size=64, num_landmarks=4, seed=4))
    assert _digest(a) == _digest(b) != _digest(c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left


def test_read_back_through_the_generic_reader(tmp_path):
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path / "syn"), synthetic_num_images=9,
                     synthetic_image_size=96, synthetic_num_landmarks=6)
    ds = build_dataset(cfg)
    assert len(ds) == 9 and ds.num_landmarks == 6
    assert ds.split("train").ids and ds.split("test1").ids
    assert set(ds.split("train").ids).isdisjoint(ds.split("test1").ids)
    sample = ds[0]
    assert sample.image.dtype == np.float32 and sample.image.shape == (96, 96)
    assert sample.spacing_mm == (0.5, 0.5) and sample.original_size == (96, 96)
    assert ds.flip_permutation == [1, 0, 3, 2, 5, 4]
    assert ds.unit == "mm"


def test_landmarks_sit_on_bright_bone():
    rng = np.random.default_rng(0)
    contrast = []
    for _ in range(10):
        points = sample_shape(rng, 8, 128)
        image = render_image(rng, points, 128)
        for x, y in points:
            xi, yi = int(round(x)), int(round(y))
            local = image[yi - 1:yi + 2, xi - 1:xi + 2].mean()
            contrast.append(local - image.mean())
    assert np.mean(contrast) > 0.25 and min(contrast) > 0.1


def test_shape_model_is_mirror_symmetric_in_distribution():
    # The mean shape is symmetric about x = 0 with the pair permutation, so flips are valid.
    base = mean_shape(8)
    mirrored = base[flip_permutation(8)] * [-1, 1]
    np.testing.assert_allclose(mirrored, base, atol=1e-12)


def test_odd_landmark_count_refused():
    with pytest.raises(ValueError, match="even"):
        mean_shape(5)
