"""Reading images to [0, 1]: the 16-bit full-scale rule (data/image_io.py's docstring)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from ddpm_landmarks.data.image_io import read_image, sixteen_bit_full_scale


@pytest.mark.parametrize("peak, scale", [
    (0, 1023), (255, 1023), (1023, 1023), (1024, 4095), (4095, 4095), (4096, 16383),
    (16383, 16383), (16384, 65535), (65535, 65535)])
def test_full_scale_is_the_smallest_bit_depth_holding_the_maximum(peak, scale):
    assert sixteen_bit_full_scale(np.array([[0, peak]], dtype=np.uint16)) == scale


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_12bit_data_in_a_16bit_file_spans_0_to_1(tmp_path, suffix):
    # A 12-bit detector's image: 0..4095 in a 16-bit container. / 65535 would leave every
    # pixel below 0.0625; / 4095 keeps the acquisition's full scale.
    pixels = np.linspace(0, 4095, 12 * 16).round().astype(np.uint16).reshape(12, 16)
    path = tmp_path / f"twelve{suffix}"
    assert cv2.imwrite(str(path), pixels)
    image = read_image(path)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, pixels / 4095, atol=1e-6)
    assert image.max() == 1.0


def test_the_rule_keeps_contrast_within_a_bit_depth(tmp_path):
    # Two 12-bit images with different maxima (>= 1024) get the same scale: no per-image stretch.
    for name, top in (("a", 4095), ("b", 2000)):
        assert cv2.imwrite(str(tmp_path / f"{name}.png"),
                           np.array([[0, 1000, top]], dtype=np.uint16))
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert a[0, 1] == b[0, 1] == pytest.approx(1000 / 4095)
    assert b[0, 2] == pytest.approx(2000 / 4095)


def test_8bit_files_by_255(tmp_path):
    assert cv2.imwrite(str(tmp_path / "e.png"), np.array([[0, 51, 255]], dtype=np.uint8))
    np.testing.assert_allclose(read_image(tmp_path / "e.png")[0], [0, 0.2, 1], atol=1e-7)
