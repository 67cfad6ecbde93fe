"""Landmarks for a folder of unlabelled images with a fine-tuned run (`ddpm-landmarks predict`).

    run = load_trained_run("runs/finetune_isbi", weights="best")
    result = predict_folder(run, "new_xrays/", overlay_dir="new_xrays_overlays/")
    write_predictions_csv(result, "preds.csv")     # image,landmark_index,name,x,y,confidence,...

Each file is read with the package's reader (data.image_io.read_image: PNG / JPEG / BMP / TIFF,
8 or 16 bit, and DICOM) and put on the model grid with exactly the evaluation transform: the
deterministic resize `original_to_model_matrix((w, h), data.image_size, data.resize_mode)`
applied with `warp_image`, then [0, 1] -> [-1, 1]. The file's own pixel grid plays the part of
the "original" grid (a predict file carries no other), so for a file that IS a dataset's stored
image the model input is the one `evaluate` feeds (in stretch mode; letterbox pads according to
the ORIGINAL aspect in evaluation, which a bare file does not know). Points are decoded on the
model grid and mapped back with the exact inverse matrix: floats in THE FILE's pixels
(pixel-centre convention), whatever the file's size and aspect. Confidence = the decoded heatmap
peak; a landmark without a usable peak has NaN coordinates (empty CSV cells) and confidence 0.

A refinement run (two stages, inference/two_stage.py) cuts its patches from the file itself
(the file is the "original" grid); `points` are the final points, `stage1` stage 1's, and the
CSV gets stage1_x, stage1_y columns.

A file that cannot be read (corrupt, empty, not an image) is logged with its name, counted as
failed, and skipped; the others are still predicted.

With the run's calibration (RUN/calibration.json, `ddpm-landmarks calibrate`) each point also
gets its conformal radius per alpha (radius@0.1, ...: the true point lies within it with
probability >= 1 - alpha, for images like the calibration images) and a flag per alpha
(flag@0.1 = 1 when the radius exceeds uncertainty.flag_radius: a point to check). The radius is
in the calibration's unit (mm) when the file's spacing is known (--spacing, or the unit is
pixels); otherwise spread / tta radii are in the file's pixels (radius_unit px, no flag: the
threshold is in mm) and none / peak radii stay in mm (not drawn). Overlays draw the first
alpha's region around each point.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from ddpm_landmarks.data.image_io import IMAGE_SUFFIXES, read_image
from ddpm_landmarks.data.intensity import to_model_input
from ddpm_landmarks.data.transforms import (
    map_to_original,
    original_to_model_matrix,
    warp_image,
)
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.evaluation import visualize
from ddpm_landmarks.evaluation.metrics import csv_text
from ddpm_landmarks.inference.calibration import file_regions
from ddpm_landmarks.inference.two_stage import Source
from ddpm_landmarks.inference.uncertainty import score_scales, two_stage_scales
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

CSV_HEADER = ("image", "landmark_index", "name", "x", "y", "confidence", "width", "height")


@dataclass
class ImagePrediction:
    name: str                   # path relative to the image folder (POSIX separators)
    path: Path
    size: tuple[int, int]       # (width, height) of the file
    points: np.ndarray          # (K, 2) float64 in the file's pixels; NaN = no usable peak
    confidence: np.ndarray      # (K,) decoded peak; 0 where missing
    radii: dict = field(default_factory=dict)   # {alpha: (K,)} with a calibration
    radius_unit: str = ""       # unit of radii: the calibration's, or px (the file's pixels)
    flags: dict = field(default_factory=dict)   # {alpha: (K,) bool}; empty when not decidable
    stage1: Optional[np.ndarray] = None   # (K, 2) stage 1's points (refinement runs)


@dataclass
class PredictResult:
    root: Path
    landmark_names: list[str]
    predictions: list[ImagePrediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (name, message)
    overlays: list[Path] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)              # calibrated: radius columns

    @property
    def total(self) -> int:
        return len(self.predictions) + len(self.failed)


# ----------------------------------------------------------------------------------------------
# Finding images
# ----------------------------------------------------------------------------------------------

def list_images(folder: str | Path, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Image files under `folder` (recursive, sorted by relative path). Hidden files and
    folders (names starting with ".", e.g. macOS "._x.png") and anything under `exclude`
    (e.g. the overlay folder of a previous run inside the image folder) are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    skip = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (here / d).resolve() not in skip]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _resolve_inputs(images: str | Path | Sequence[str | Path],
                    exclude: Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """(root the CSV names are relative to, files) for a folder, one file, or a list of files."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if not path.exists():
            raise DataError(f"image folder not found: {path}")
        if path.is_dir():
            files = list_images(path, exclude)
            if not files:
                raise DataError(f"no images found in {path} (looked for "
                                f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} files)")
            return path, files
        images = [path]
    files = [Path(p) for p in images]
    if not files:
        raise DataError("no images given")
    root = Path(os.path.commonpath([str(p.absolute().parent) for p in files]))
    return root, files


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.absolute().relative_to(root).as_posix()


def overlay_names(names: Sequence[str]) -> dict[str, str]:
    """Overlay file name per image name: the same relative path with suffix .png; when two
    images would collide (a.jpg and a.png) the original suffix is kept in the name (a_jpg.png)."""
    plain = {n: Path(n).with_suffix(".png").as_posix() for n in names}
    counts: dict[str, int] = {}
    for v in plain.values():
        counts[v] = counts.get(v, 0) + 1
    out = {}
    for n, v in plain.items():
        if counts[v] > 1:
            p = Path(n)
            v = (p.parent / f"{p.stem}_{p.suffix.lstrip('.').lower()}.png").as_posix()
        out[n] = v
    return out


# ----------------------------------------------------------------------------------------------
# The run's landmark names and flip permutation (from its dataset, when available)
# ----------------------------------------------------------------------------------------------

def _dataset_of(cfg):
    """The run's labelled dataset, without generating the synthetic one (DataError if absent)."""
    from ddpm_landmarks.data.registry import build_dataset
    if cfg.data.dataset == "synthetic":
        from ddpm_landmarks.data.synthetic import default_cache_dir, spec_from_config
        from ddpm_landmarks.utils.paths import expand_path
        root = expand_path(cfg.data.root) if cfg.data.root else \
            default_cache_dir() / f"synthetic_{spec_from_config(cfg.data).key()}"
        if not (root / "manifest.csv").is_file():
            raise DataError(f"synthetic data not generated at {root}")
    return build_dataset(cfg.data)


def landmark_info(cfg, num_landmarks: int) -> tuple[list[str], Optional[list[int]], str]:
    """(names, flip permutation or None, why the dataset was not used or "").

    Names and permutation come from the run's dataset when it can be read and has
    `num_landmarks` landmarks; otherwise the names are "L0", "L1", ... and there is no
    permutation (predict never needs the labelled data itself)."""
    fallback = [f"L{k}" for k in range(num_landmarks)]
    try:
        dataset = _dataset_of(cfg)
    except (DataError, ConfigError, OSError, ValueError) as err:
        return fallback, None, str(err)
    if dataset.num_landmarks != num_landmarks:
        return fallback, None, (f"dataset {dataset.name} has {dataset.num_landmarks} landmarks, "
                                f"the model predicts {num_landmarks}")
    return list(dataset.landmark_names), dataset.flip_permutation, ""


# ----------------------------------------------------------------------------------------------
# One image onto the model grid
# ----------------------------------------------------------------------------------------------

def to_model_grid(image: np.ndarray, size: int, mode: str, intensity_norm: str = "fixed"
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """float32 (H, W) [0, 1] file image -> ((1, S, S) float32 tensor in [-1, 1], 3x3 model grid
    -> file pixels). The same operations, in the same order and precision, as
    LandmarkTransform(train=False) + HeatmapDataset for an image stored at its original size."""
    h, w = image.shape[:2]
    matrix = original_to_model_matrix((w, h), size, mode)
    warped = warp_image(image, matrix, size).astype(np.float32, copy=False)
    tensor = torch.from_numpy(to_model_input(warped, intensity_norm)).unsqueeze(0)
    return tensor, np.linalg.inv(matrix)


def _load(path: Path, size: int, mode: str, intensity_norm: str = "fixed"):
    """(file image, model-grid tensor, model -> file matrix); DataError naming the file."""
    try:
        image = read_image(path)
        if image.ndim != 2 or min(image.shape) < 1:
            raise DataError(f"{path}: expected a 2-D gray image, got shape {image.shape}")
        tensor, to_file = to_model_grid(image, size, mode, intensity_norm)
    except DataError:
        raise
    except (OSError, ValueError, cv2.error, MemoryError) as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
    return image, tensor, to_file


# ----------------------------------------------------------------------------------------------
# A folder
# ----------------------------------------------------------------------------------------------

def predict_folder(run, images: str | Path | Sequence[str | Path], flip_tta: Optional[bool] = None,
                   batch_size: Optional[int] = None,
                   overlay_dir: Optional[str | Path] = None,
                   spacing: Optional[tuple[float, float]] = None) -> PredictResult:
    """Predict every image of a folder (recursive) or list of files with a TrainedRun.

    Points are floats in each file's own pixels. flip_tta None = the run's eval.flip_tta;
    batch_size None = the run's eval.batch_size. With `overlay_dir`, one PNG per image (the
    prediction drawn and numbered on the file) is written there, atomically, as it goes.
    With the run's calibration, radii and flags (module doc); `spacing` = (x, y) mm per file
    pixel of every file, for radii in mm. Unreadable files are logged and listed in
    `result.failed`; DataError when there is nothing to predict at all."""
    cfg = run.cfg
    size, mode = int(cfg.data.image_size), cfg.data.resize_mode
    tta = cfg.eval.flip_tta if flip_tta is None else bool(flip_tta)
    batch_size = int(cfg.eval.batch_size if batch_size is None else batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    overlay_dir = Path(overlay_dir) if overlay_dir is not None else None
    root, files = _resolve_inputs(images, [overlay_dir] if overlay_dir is not None else [])

    names, permutation, why = landmark_info(cfg, run.model.num_landmarks)
    if why:
        log.info("landmark names L0..L%d (run's dataset not used: %s)",
                 run.model.num_landmarks - 1, why)
    if tta and permutation is None:
        reason = why or f"dataset {cfg.data.dataset} has none"
        raise ConfigError("flip test-time augmentation needs the left/right landmark permutation "
                          f"of the run's dataset, which is not available ({reason}); drop "
                          "--flip-tta or set eval.flip_tta=false")
    two_stage = run.refine is not None
    estimator, calibration, _ = run.scoring(permutation, tta)   # two stages: TwoStagePredictor
    if calibration is None:
        log.info("no radii: %s has no calibration for these weights (ddpm-landmarks calibrate)",
                 run.run_dir)
    flag_radius = cfg.uncertainty.flag_radius
    if calibration is not None and flag_radius is None:
        flag_radius = calibration.uncertainty.flag_radius      # resolved for the dataset

    result = PredictResult(root=root, landmark_names=names,
                           alphas=list(calibration.alphas) if calibration else [])
    rel = {p: _relative_name(p, root) for p in files}
    overlay_as = overlay_names(list(rel.values())) if overlay_dir is not None else {}
    # (path, (w, h), file image if an overlay is drawn else None, model input, model -> file,
    # file image if stage 2 cuts patches from it else None)
    pending: list[tuple] = []

    def flush() -> None:
        if not pending:
            return
        images = torch.stack([item[3] for item in pending])
        if two_stage:
            sources = [Source(item[5], np.eye(3), item[4], item[1]) for item in pending]
            out = estimator.predict(images, sources)
            found = zip(out.final, out.final_peak, out.stage1)

            def scales_for(unit_scale):
                return two_stage_scales(out, unit_scale, calibration.uncertainty.score_floor)
        else:
            grid = estimator.estimate(images)
            found = ((map_to_original(p, item[4]), c, None)
                     for item, p, c in zip(pending, grid.points, grid.peak))

            def scales_for(unit_scale):
                return score_scales(grid, np.stack([item[4] for item in pending]), unit_scale,
                                    calibration.uncertainty.score_floor)
        regions = [({}, "", {}, None)] * len(pending)
        if calibration is not None:
            regions = file_regions(calibration, scales_for, [item[1] for item in pending],
                                   spacing, flag_radius)
        for (path, wh, image, *_), (points, c, stage1), (radii, unit, flags, axes) in zip(
                pending, found, regions):
            name = rel[path]
            result.predictions.append(ImagePrediction(
                name=name, path=path, size=wh, points=points,
                confidence=np.asarray(c, dtype=np.float64), radii=radii, radius_unit=unit,
                flags=flags, stage1=stage1))
            if image is not None:
                drawn = visualize.overlay(image, pred=points, title=name, regions=axes)
                result.overlays.append(visualize.write_png(overlay_dir / overlay_as[name], drawn))
        pending.clear()

    for path in files:
        try:
            image, tensor, to_file = _load(path, size, mode, cfg.data.intensity_norm)
        except DataError as err:
            message = str(err)
            if str(path) not in message:
                message = f"{path}: {message}"
            log.error("skipped %s", message)
            result.failed.append((rel[path], message))
            continue
        pending.append((path, (image.shape[1], image.shape[0]),
                        image if overlay_dir is not None else None, tensor, to_file,
                        image if two_stage else None))
        if len(pending) == batch_size:
            flush()
    flush()
    return result


def csv_header(result: PredictResult) -> tuple[str, ...]:
    """CSV_HEADER, plus radius@a ..., radius_unit, flag@a ... with a calibration."""
    if not result.alphas:
        return CSV_HEADER
    return CSV_HEADER + tuple(f"radius@{a:g}" for a in result.alphas) + ("radius_unit",) + \
        tuple(f"flag@{a:g}" for a in result.alphas)


def prediction_rows(result: PredictResult) -> list[list]:
    rows = []
    for pred in result.predictions:
        w, h = pred.size
        for k, ((x, y), c) in enumerate(zip(pred.points, pred.confidence)):
            if not (np.isfinite(x) and np.isfinite(y)):
                x = y = float("nan")              # missing: both cells empty
                c = 0.0
            row = [pred.name, k, result.landmark_names[k], float(x), float(y), float(c), w, h]
            if result.alphas:
                row += [float(pred.radii[a][k]) for a in result.alphas] + [pred.radius_unit]
                row += [int(pred.flags[a][k]) if pred.flags else "" for a in result.alphas]
            if pred.stage1 is not None:
                row += [float(v) for v in pred.stage1[k]]
            rows.append(row)
    return rows


def write_predictions_csv(result: PredictResult, path: str | Path) -> Path:
    """image,landmark_index,name,x,y,confidence,width,height (+ radius@a..., radius_unit,
    flag@a... with a calibration; an infinite radius is "inf"; + stage1_x,stage1_y for a
    refinement run); coordinates in the file's pixels at full precision (repr), a missing
    landmark has empty x, y and confidence 0. Atomic."""
    two_stage = any(p.stage1 is not None for p in result.predictions)
    header = csv_header(result) + (("stage1_x", "stage1_y") if two_stage else ())
    return atomic_write_text(Path(path), csv_text(header, prediction_rows(result)))


def read_predictions_csv(path: str | Path) -> dict[str, dict]:
    """Read a predict CSV back: {image: {"points": (K, 2), "confidence": (K,), "size": (w, h),
    "names": [...]}} (NaN for empty coordinates), plus "radius" {alpha: (K,)}, "radius_unit"
    and "flag" {alpha: (K,) 1 / 0 / -1 undecided} when the CSV has radius columns."""
    import csv

    out: dict[str, dict] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            entry = out.setdefault(row["image"], {"rows": [], "size": (int(row["width"]),
                                                                        int(row["height"]))})
            entry["rows"].append(row)
    for entry in out.values():
        rows = sorted(entry.pop("rows"), key=lambda r: int(r["landmark_index"]))
        entry["points"] = np.array([[float(r["x"]) if r["x"] else np.nan,
                                     float(r["y"]) if r["y"] else np.nan] for r in rows])
        entry["confidence"] = np.array([float(r["confidence"]) for r in rows])
        entry["names"] = [r["name"] for r in rows]
        alphas = [c[len("radius@"):] for c in rows[0] if c.startswith("radius@")]
        if alphas:                          # calibrated: {alpha: (K,)}, inf parsed by float()
            entry["radius"] = {float(a): np.array([float(r[f"radius@{a}"]) for r in rows])
                               for a in alphas}
            entry["radius_unit"] = rows[0]["radius_unit"]
            entry["flag"] = {float(a): np.array([int(r[f"flag@{a}"]) if r[f"flag@{a}"] != ""
                                                 else -1 for r in rows]) for a in alphas}
    return out
