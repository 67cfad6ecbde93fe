"""Reading x-ray images into float32 [0, 1] arrays on their own pixel grid.

Grey levels are divided by the full scale of the bit depth the data was acquired at, never
stretched to the image's own min..max (a per-image stretch changes contrast from image to image):
- 8-bit files: / 255.
- 16-bit PNG / TIFF: x-ray detectors store 10, 12 or 14 bits in a 16-bit container, and the
  file does not say which. The rule (`sixteen_bit_full_scale`): divide by the smallest of
  2^10 - 1, 2^12 - 1, 2^14 - 1, 2^16 - 1 that holds the image's maximum. 12-bit data
  (max <= 4095) is divided by 4095 and spans [0, 1], where / 65535 would leave every pixel
  below 0.0625. Deterministic per image; its one failure mode is a 12-bit image whose
  brightest pixel is below 1024 (it would be read as 10-bit, 4x brighter): real radiographs
  reach their detector's upper range (collimator edges, markers), and `data inspect` shows
  the stored ranges. 8-bit data written into a 16-bit file (max <= 255) is read as 10-bit.
- float files: must already lie in [0, 1].
- DICOM: ddpm_landmarks.data.dicom (Modality LUT, VOI LUT / window, else the BitsStored range,
  MONOCHROME1 inverted).
Colour files are converted to gray.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ddpm_landmarks.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
# Bit depths x-ray data comes in inside a 16-bit container (module doc).
SIXTEEN_BIT_DEPTHS = (10, 12, 14, 16)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    # DICOM files without a suffix are common: the 'DICM' magic sits after a 128-byte preamble.
    if path.suffix == "":
        try:
            with open(path, "rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        except OSError:
            return False
    return False


def to_unit_float(array: np.ndarray, where: str) -> np.ndarray:
    """Integer or float pixel array -> float32 gray in [0, 1]."""
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2GRAY)
        elif array.shape[2] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_BGR2GRAY)
        elif array.shape[2] == 1:
            array = array[:, :, 0]
    if array.ndim != 2:
        raise DataError(f"{where}: expected a 2-D gray image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(sixteen_bit_full_scale(array))
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{where}: image contains NaN or infinite pixels")
        if out.min() < 0 or out.max() > 1:
            raise DataError(f"{where}: float image outside [0, 1] "
                            f"(min {out.min():.3g}, max {out.max():.3g})")
        return out
    raise DataError(f"{where}: unsupported pixel type {array.dtype}")


def sixteen_bit_full_scale(array: np.ndarray) -> int:
    """2^b - 1 for the smallest b of SIXTEEN_BIT_DEPTHS whose range holds the array's maximum."""
    peak = int(array.max()) if array.size else 0
    return next(2 ** bits - 1 for bits in SIXTEEN_BIT_DEPTHS if peak <= 2 ** bits - 1)


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as float32 (H, W) in [0, 1]; DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    if is_dicom(path):
        from ddpm_landmarks.data.dicom import read_dicom
        return read_dicom(path).image
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise DataError(f"cannot read image (corrupt or unsupported format): {path}")
    return to_unit_float(array, str(path))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    image = read_image(path)
    return image.shape[1], image.shape[0]
