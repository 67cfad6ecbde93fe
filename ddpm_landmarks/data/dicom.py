"""Reading one DICOM x-ray into a float32 [0, 1] image plus its pixel spacing.

Grey values, in the order the standard defines (PS3.4 N.2):
1. stored values -> Modality LUT (or Rescale Slope/Intercept): manufacturer-independent values;
2. -> VOI LUT (or Window Centre/Width, the first of several): the grey range the acquiring
   site chose to display;
3. -> [0, 1]: windowing is normalised by its output range (not the image's min/max, so the
   site's window is kept), a VOI LUT by the range of its entries. Without either, by the range
   the stored bits can hold (BitsStored, signed per PixelRepresentation: 12-bit data in a
   16-bit container spans 0..4095, not 0..65535) sent through step 1, never the image's own
   min..max (a per-image stretch changes contrast from image to image). pydicom 3 already
   masks the bits above BitsStored when it decodes, and its windowing takes its output range
   from BitsStored too; float pixel data (no BitsStored) falls back to its min..max;
4. MONOCHROME1 (low value = white) is inverted, so bone is bright in every image, as in
   MONOCHROME2 and in the PNGs the rest of the package reads. A Presentation LUT Shape is not
   applied on top: for DX it only restates the photometric interpretation (INVERSE for
   MONOCHROME1), and applying both would invert twice.
Multi-frame and colour images are refused (DataError): x-ray landmarks are one grey frame.

Pixel spacing is returned as (x, y) mm per pixel. Both tags below hold [row spacing,
column spacing] = (y, x), so (x, y) = (value[1], value[0]); swapping them is a known bug.
Which tag wins:
- PixelSpacing (0028,0030) when present. In projection radiography it is the spacing
  calibrated at the patient (or corrected per IHE Mammography / PS3.3 C.8.11.7 "Pixel
  Spacing Calibration"), i.e. the size of the anatomy, which is what landmark errors in mm
  are meant to measure.
- otherwise ImagerPixelSpacing (0018,1164): the spacing at the front plane of the detector.
  Because the x-ray beam diverges from the source, anatomy is projected magnified onto the
  detector, so this spacing overestimates anatomical sizes by the geometric magnification
  (typically 5-15 %). It is still the best information left; we do not divide by the
  Estimated Radiographic Magnification Factor (0018,1114) because that factor is an estimate
  for one plane of the patient only, and silently mixing corrected and uncorrected values
  would make errors incomparable. `spacing_source` says which tag was used, so callers can
  report it.
- neither (or only malformed values): None, spacing_source "none"; callers report pixels.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut
except ImportError:  # pydicom 2.4 kept the same functions here
    from pydicom.pixel_data_handlers.util import (
        apply_modality_lut,
        apply_voi,
        apply_voi_lut,
    )

from ddpm_landmarks.errors import DataError

log = logging.getLogger(__name__)

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing")  # in order of preference, see above


@dataclass
class DicomImage:
    image: np.ndarray                          # float32 (H, W) in [0, 1], bone bright
    spacing_mm: Optional[tuple[float, float]]  # (x, y) mm per pixel; None = unknown
    spacing_source: str                        # "PixelSpacing" | "ImagerPixelSpacing" | "none"
    photometric: str                           # PhotometricInterpretation as stored


def read_dicom(path: str | Path) -> DicomImage:
    """Read a single-frame grey DICOM file; DataError naming the file for anything unusable."""
    path = Path(path)
    ds = _parse(path)
    spacing, source = dicom_spacing(ds, str(path))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    return DicomImage(image=_grey_pixels(ds, photometric, str(path)), spacing_mm=spacing,
                      spacing_source=source, photometric=photometric)


def read_dicom_spacing(path: str | Path) -> tuple[Optional[tuple[float, float]], str]:
    """((x, y) mm per pixel, tag used) from the header only: cheap enough for dataset indexing."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as err:
        raise DataError(f"cannot parse DICOM file {path}: {err}") from None
    return dicom_spacing(ds, str(path))


def _parse(path: Path) -> pydicom.Dataset:
    if not path.is_file():
        raise DataError(f"DICOM file not found: {path}")
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # Older files often lack the 128-byte preamble + 'DICM'; force reads them anyway.
            # Garbage then fails below for want of pixel data, with the same kind of error.
            ds = pydicom.dcmread(path, force=True)
    except Exception as err:  # pydicom raises many types for broken files; all mean the same
        raise DataError(f"cannot parse DICOM file {path}: {err}") from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError(f"DICOM file has no pixel data (not an image, or not DICOM): {path}")
    return ds


def dicom_spacing(ds: pydicom.Dataset, where: str = "") -> tuple[Optional[tuple[float, float]], str]:
    """((x, y) mm per pixel, tag used) from PixelSpacing, else ImagerPixelSpacing, else None."""
    for tag in _SPACING_TAGS:
        if tag not in ds or ds[tag].value in (None, ""):
            continue
        try:
            row_spacing, col_spacing = (float(v) for v in ds[tag].value)
        except (TypeError, ValueError):
            log.warning("%s: malformed %s %r ignored", where, tag, ds[tag].value)
            continue
        if not all(math.isfinite(v) and v > 0 for v in (row_spacing, col_spacing)):
            log.warning("%s: non-positive %s %r ignored", where, tag, ds[tag].value)
            continue
        # Stored as [row spacing (y), column spacing (x)]: swap to (x, y).
        return (col_spacing, row_spacing), tag
    return None, "none"


def _grey_pixels(ds: pydicom.Dataset, photometric: str, where: str) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{where}: multi-frame DICOM ({frames} frames) is not supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{where}: colour DICOM (PhotometricInterpretation {photometric!r}, "
                        f"{samples} samples per pixel) is not supported; expected grey")
    try:
        stored = ds.pixel_array
    except Exception as err:  # missing codec, truncated pixel data, inconsistent header ...
        raise DataError(f"{where}: cannot decode DICOM pixel data: {err}") from None
    if stored.ndim != 2:
        raise DataError(f"{where}: expected a 2-D grey image, got shape {stored.shape}")
    try:
        values = apply_modality_lut(stored, ds)
        image = _voi_to_unit(values, ds)
    except DataError:
        raise
    except Exception as err:  # e.g. window width < 1, unsupported LUT depth
        raise DataError(f"{where}: cannot apply the DICOM grey-level transforms: {err}") from None
    if not np.isfinite(image).all():
        raise DataError(f"{where}: image contains NaN or infinite pixels")
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _voi_to_unit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply VOI LUT / windowing and normalise by its output range; else the data's min..max."""
    has_lut = bool(ds.get("VOILUTSequence")) and all(
        ds.VOILUTSequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
            values = values.astype(np.int64)  # LUTs index integers; a rescale gave floats
        out = apply_voi_lut(values, ds).astype(np.float64)
        # Every entry of the LUT, to normalise by the LUT's own range (its nominal bit depth
        # often exceeds the values it uses, e.g. 12-bit data in a 16-bit LUT).
        n_entries, first = int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 2 ** 16, \
            int(ds.VOILUTSequence[0].LUTDescriptor[1])
        lut = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds).astype(np.float64)
        low, high = float(lut.min()), float(lut.max())
    elif has_window:
        out = apply_voi_lut(values.astype(np.float64), ds)
        # Output range = what the window maps far-below and far-above inputs to. Probing keeps
        # us consistent with pydicom's range rules (bits stored, signedness, rescale), and
        # a negative rescale slope still maps "below the window" to black.
        with np.errstate(over="ignore"):
            low, high = (float(v) for v in apply_voi_lut(np.array([-1e30, 1e30]), ds))
    else:
        out = values.astype(np.float64)
        low, high = _stored_range(ds, out)
    if high == low:  # constant image (or a degenerate LUT): nothing to show
        return np.zeros(out.shape, dtype=np.float64)
    return (out - low) / (high - low)


def _stored_range(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float]:
    """(low, high) of what the stored bits can hold (BitsStored, PixelRepresentation) after
    the Modality LUT / rescale; float pixel data has no stored bits: its own min..max."""
    bits = ds.get("BitsStored")
    if "PixelData" not in ds or not bits:
        return float(values.min()), float(values.max())
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:        # two's complement
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        ends = np.array([0, 2 ** bits - 1], dtype=np.int64)
    mapped = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    return float(mapped.min()), float(mapped.max())           # a negative slope swaps them
