"""Reading x-ray images into float32 [0, 1] arrays on their own pixel grid.

8-bit files are divided by 255, 16-bit by 65535 (the container's range, not the image's
min/max: a per-image stretch would change contrast from image to image). Colour files are
converted to gray. DICOM goes through ddpm_landmarks.data.dicom (rescale, VOI LUT, MONOCHROME1).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ddpm_landmarks.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


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
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{where}: image contains NaN or infinite pixels")
        if out.min() < 0 or out.max() > 1:
            raise DataError(f"{where}: float image outside [0, 1] "
                            f"(min {out.min():.3g}, max {out.max():.3g})")
        return out
    raise DataError(f"{where}: unsupported pixel type {array.dtype}")


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
