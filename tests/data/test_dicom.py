"""DICOM reading: grey-level transforms, MONOCHROME1, spacing tags and their (x, y) order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ddpm_landmarks.data.dicom import read_dicom
from ddpm_landmarks.data.image_io import read_image
from ddpm_landmarks.errors import DataError


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, **tags) -> Path:
    """A minimal single-frame grey DICOM file; extra keyword arguments become DICOM tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(dtype=np.uint16, high: int = 4095) -> np.ndarray:
    return np.linspace(0, high, 6 * 8).reshape(6, 8).round().astype(dtype)


def test_12bit_in_16bit_container_uses_bits_stored_not_min_max(tmp_path):
    # Without a window, stored values are divided by 2^BitsStored - 1: the image keeps its
    # contrast (100..3000 of 4095), is not stretched to [0, 1], and is not / 65535 either.
    pixels = np.clip(ramp(), 100, 3000)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    assert out.image.dtype == np.float32 and out.image.shape == (6, 8)
    np.testing.assert_allclose(out.image, pixels / 4095, atol=1e-6)
    assert out.photometric == "MONOCHROME2"


def test_bits_above_bits_stored_are_masked(tmp_path):
    # pydicom 3 masks the unused high bits: 4096 + 7 stored in a 12-bit image is 7.
    pixels = np.array([[0, 4095, 4096 + 7]], dtype=np.uint16)
    image = read_dicom(write_dicom(tmp_path / "m.dcm", pixels, bits_stored=12)).image[0]
    np.testing.assert_allclose(image, [0, 1, 7 / 4095], atol=1e-6)


def test_signed_12bit_spans_its_two_complement_range(tmp_path):
    pixels = np.array([[-2048, 0, 2047]], dtype=np.int16)
    image = read_dicom(write_dicom(tmp_path / "s.dcm", pixels, bits_stored=12)).image[0]
    np.testing.assert_allclose(image, [0, 2048 / 4095, 1], atol=1e-6)


def test_rescale_slope_intercept_then_window(tmp_path):
    # stored 0..4095 -> rescale to -1024..3071; window [0, 1000) in rescaled units.
    pixels = np.array([[0, 1024, 1524, 2024, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", pixels, bits_stored=12, RescaleSlope=1,
                       RescaleIntercept=-1024, WindowCenter=500, WindowWidth=1000)
    image = read_dicom(path).image[0]
    assert image[0] == 0.0                      # -1024: below the window
    assert image[1] == pytest.approx(0.0, abs=1e-3)   # 0: window's lower edge
    assert image[2] == pytest.approx(0.5, abs=1e-3)   # 500: centre
    assert image[3] == pytest.approx(1.0, abs=1e-3)   # 1000: upper edge
    assert image[4] == 1.0                      # far above


def test_rescale_without_window_maps_the_stored_range(tmp_path):
    # The stored range 0..4095 goes through the rescale like the pixels: an affine rescale
    # leaves v / 4095, a negative slope reverses the range (and the grey levels) consistently.
    pixels = np.array([[10, 20, 30, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "s.dcm", pixels, bits_stored=12, RescaleSlope=2.0,
                       RescaleIntercept=-5)
    np.testing.assert_allclose(read_dicom(path).image[0], pixels[0] / 4095, atol=1e-6)
    path = write_dicom(tmp_path / "n.dcm", pixels, bits_stored=12, RescaleSlope=-1.0,
                       RescaleIntercept=4095)
    np.testing.assert_allclose(read_dicom(path).image[0], 1 - pixels[0] / 4095, atol=1e-6)


def test_window_keeps_site_contrast_not_image_stretch(tmp_path):
    # A window much wider than the data must not be stretched to [0, 1].
    pixels = np.array([[1000, 1100]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12,
                       WindowCenter=2048, WindowWidth=4096)
    image = read_dicom(path).image[0]
    assert 0.2 < image[0] < image[1] < 0.3


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.zeros((4, 4), dtype=np.uint16)
    pixels[1, 2] = 4095                          # bright stored value = dark in MONOCHROME1
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12)).image
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", pixels, bits_stored=12,
                                   photometric="MONOCHROME1"))
    assert mono2[1, 2] == 1.0 and mono2[0, 0] == 0.0
    assert mono1.photometric == "MONOCHROME1"
    assert mono1.image[1, 2] == 0.0 and mono1.image[0, 0] == 1.0


def test_8bit_monochrome1_with_window(tmp_path):
    pixels = np.array([[0, 128, 255]], dtype=np.uint8)
    path = write_dicom(tmp_path / "e.dcm", pixels, photometric="MONOCHROME1",
                       WindowCenter=128, WindowWidth=256)
    image = read_dicom(path).image[0]
    assert image[0] > image[1] > image[2]


def test_anisotropic_pixel_spacing_is_returned_as_x_y(tmp_path):
    # PixelSpacing = [row spacing, column spacing] = [y, x].
    out = read_dicom(write_dicom(tmp_path / "p.dcm", ramp(), PixelSpacing=[0.2, 0.1]))
    assert out.spacing_mm == pytest.approx((0.1, 0.2))
    assert out.spacing_source == "PixelSpacing"


def test_imager_pixel_spacing_fallback(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "i.dcm", ramp(), ImagerPixelSpacing=[0.15, 0.14]))
    assert out.spacing_mm == pytest.approx((0.14, 0.15))
    assert out.spacing_source == "ImagerPixelSpacing"


def test_pixel_spacing_wins_over_imager_pixel_spacing(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "b.dcm", ramp(), PixelSpacing=[0.1, 0.1],
                                 ImagerPixelSpacing=[0.11, 0.11]))
    assert out.spacing_mm == pytest.approx((0.1, 0.1))
    assert out.spacing_source == "PixelSpacing"


def test_malformed_pixel_spacing_falls_back(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "z.dcm", ramp(), PixelSpacing=[0, 0],
                                 ImagerPixelSpacing=[0.2, 0.2]))
    assert out.spacing_source == "ImagerPixelSpacing"


def test_no_spacing_is_none(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "n.dcm", ramp()))
    assert out.spacing_mm is None
    assert out.spacing_source == "none"


def test_corrupt_file_names_the_path(tmp_path):
    bad = tmp_path / "corrupt.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x08\x00\x05\x00garbage" * 3)
    with pytest.raises(DataError, match="corrupt.dcm"):
        read_dicom(bad)
    random_bytes = tmp_path / "noise.dcm"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DataError, match="noise.dcm"):
        read_dicom(random_bytes)


def test_truncated_pixel_data_names_the_path(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", ramp())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="t.dcm"):
        read_dicom(path)


def test_missing_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", ramp())
    from pydicom import dcmread
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="no pixel data.*np.dcm"):
        read_dicom(path)


def test_multiframe_and_colour_refused(tmp_path):
    frames = np.zeros((2, 4, 4), dtype=np.uint16)
    path = write_dicom(tmp_path / "mf.dcm", frames.reshape(8, 4), Rows=4, NumberOfFrames=2)
    with pytest.raises(DataError, match="multi-frame"):
        read_dicom(path)
    path = write_dicom(tmp_path / "rgb.dcm", np.zeros((4, 12), dtype=np.uint8),
                       photometric="RGB", SamplesPerPixel=3, Columns=4, PlanarConfiguration=0)
    with pytest.raises(DataError, match="colour"):
        read_dicom(path)


def test_read_image_dispatches_dcm_and_extensionless(tmp_path):
    pixels = ramp()
    with_suffix = write_dicom(tmp_path / "x.dcm", pixels)
    no_suffix = write_dicom(tmp_path / "IM0001", pixels)
    a, b = read_image(with_suffix), read_image(no_suffix)
    assert a.dtype == np.float32 and a.shape == (6, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, read_dicom(with_suffix).image)


def test_generic_dataset_of_dicoms_takes_spacing_from_the_header(tmp_path):
    """A hospital export: DICOM images + landmarks.csv, no manifest. mm come from PixelSpacing
    as (x, y) = (column, row) spacing, so an x offset is scaled by the column spacing."""
    from ddpm_landmarks.config.common import EvalConfig
    from ddpm_landmarks.data.generic import read_landmark_folder
    from ddpm_landmarks.evaluation.evaluate import GroundTruth, evaluate_predictions

    (tmp_path / "images").mkdir()
    write_dicom(tmp_path / "images" / "a.dcm", ramp(), PixelSpacing=[0.2, 0.1])
    write_dicom(tmp_path / "images" / "b.dcm", ramp(), ImagerPixelSpacing=[0.3, 0.3])
    (tmp_path / "landmarks.csv").write_text(
        "image,landmark_index,x,y\na.dcm,0,2,2\nb.dcm,0,3,3\n")
    ds = read_landmark_folder(tmp_path, num_landmarks=1)
    assert ds.unit == "mm"
    assert [r.spacing_mm for r in ds.records] == [(0.1, 0.2), (0.3, 0.3)]
    samples = list(ds)
    assert samples[0].image.shape == (6, 8) and samples[0].original_size == (8, 6)
    # Predictions 10 px to the right of the truth: 1.0 mm on a (x 0.1 mm), 3.0 mm on b.
    preds = np.stack([s.landmarks + [10.0, 0.0] for s in samples])
    summary = evaluate_predictions(ds, [GroundTruth.of(s) for s in samples], preds,
                                   EvalConfig(sdr_thresholds=[1.0, 2.0]))
    np.testing.assert_allclose(summary["errors"][:, 0], [1.0, 3.0])
    assert summary["sdr"][1.0] == 50.0
