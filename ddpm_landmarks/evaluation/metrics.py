"""Radial errors, MRE / SD / SDR, per-landmark tables and result files.

Errors are computed from coordinates in ORIGINAL pixels, converted per image with a scale
(sx, sy): error = sqrt((dx * sx)^2 + (dy * sy)^2). The x spacing multiplies the x difference;
swapping them (DICOM stores (row, col)) is a known bug of published code.

Missing-value policy (encoded in the error array itself, so nothing is silently dropped):
- ground truth missing (NaN)                  -> error NaN: not evaluated, in no statistic.
- ground truth present, prediction missing    -> error +inf: a MISS. It counts in n and as not
  detected at every SDR threshold; MRE / SD / median are over the predicted points only and the
  number of misses is reported next to them as `missed` (an MRE without its miss count would
  flatter a model that abstains on hard landmarks).

SD is the population standard deviation (ddof=0) over all evaluated image-landmark pairs, as
ISBI 2015 papers report "MRE +/- SD" over all pairs. SDR is in percent of n, with
error <= threshold counting as detected (inclusive=True, the field's habit) or < (False).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ddpm_landmarks.utils.atomic import atomic_write_text

POLICY = ("errors in {unit}; n = image-landmark pairs with ground truth; a missing prediction "
          "is a miss: not detected at any SDR threshold, excluded from MRE/SD/median and "
          "counted in 'missed'; SD is the population std (ddof=0); SDR counts error {op} t")


def radial_errors(pred: np.ndarray, gt: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, K) errors for (N, K, 2) points and (N, 2) per-image (sx, sy) scales (or one (2,)).

    NaN where gt is missing; +inf where gt exists but the prediction is missing (a miss).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred and gt must both be (N, K, 2); got {pred.shape} and {gt.shape}")
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (pred.shape[0], 2))
    d = (pred - gt) * scale[:, None, :]                    # x diff * sx, y diff * sy
    errors = np.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2)
    gt_ok = np.isfinite(gt).all(axis=-1)
    pred_ok = np.isfinite(pred).all(axis=-1)
    errors[gt_ok & ~pred_ok] = np.inf
    errors[~gt_ok] = np.nan
    return errors


def summarize(errors: np.ndarray, thresholds: Sequence[float],
              inclusive: bool = True) -> dict[str, Any]:
    """MRE, SD (ddof=0), median, SDR (% per threshold), n, missed over all evaluated pairs.

    Keys: mre, sd, median, sdr ({threshold: percent}), n, missed, thresholds, inclusive.
    Statistics of an empty set are NaN.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    e = e[~np.isnan(e)]                                     # drop pairs without ground truth
    n = int(e.size)
    missed = int(np.isinf(e).sum())
    found = e[np.isfinite(e)]
    nan = float("nan")
    sdr = {}
    for t in thresholds:
        hits = (found <= t) if inclusive else (found < t)
        sdr[float(t)] = 100.0 * float(hits.sum()) / n if n else nan
    return {
        "mre": float(found.mean()) if found.size else nan,
        "sd": float(found.std(ddof=0)) if found.size else nan,
        "median": float(np.median(found)) if found.size else nan,
        "sdr": sdr,
        "n": n,
        "missed": missed,
        "thresholds": [float(t) for t in thresholds],
        "inclusive": bool(inclusive),
    }


def _sdr_key(t: float) -> str:
    return f"sdr@{t:g}"


def per_landmark_table(errors: np.ndarray, names: Sequence[str], thresholds: Sequence[float],
                       inclusive: bool = True) -> list[dict[str, Any]]:
    """One row per landmark: landmark_index, name, n, missed, mre, sd, median, sdr@<t>..."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[1] != len(names):
        raise ValueError(f"errors must be (N, K) with K = {len(names)} names, got {errors.shape}")
    rows = []
    for k, name in enumerate(names):
        s = summarize(errors[:, k], thresholds, inclusive)
        row = {"landmark_index": k, "name": str(name), "n": s["n"], "missed": s["missed"],
               "mre": s["mre"], "sd": s["sd"], "median": s["median"]}
        row.update({_sdr_key(t): v for t, v in s["sdr"].items()})
        rows.append(row)
    return rows


def measurement_scale(dataset, record_or_sample) -> tuple[tuple[float, float], str]:
    """((sx, sy), unit) converting ORIGINAL-pixel differences of one image into dataset.unit.

    'mm': the image's spacing_mm (x, y); 'px': (1, 1); 'px@WxH': reference grid / original
    grid. `record_or_sample` is anything with `id`, `spacing_mm` and `original_size` (W, H):
    a Record (whose original_size may be None -> pass the LandmarkSample instead) or a sample.
    """
    unit = dataset.unit
    ident = getattr(record_or_sample, "id", "?")
    if unit == "mm":
        spacing = record_or_sample.spacing_mm
        if spacing is None:
            raise ValueError(f"{dataset.name}/{ident}: errors are reported in mm but this image "
                             f"has no pixel spacing")
        return (float(spacing[0]), float(spacing[1])), unit
    if unit == "px":
        return (1.0, 1.0), unit
    if unit.startswith("px@"):
        ref = dataset.reference_size
        if ref is None:                                     # e.g. "px@512x512"
            ref = tuple(int(v) for v in unit[3:].lower().split("x"))
        original = record_or_sample.original_size
        if original is None:
            raise ValueError(f"{dataset.name}/{ident}: original_size unknown for a {unit} "
                             f"error; pass the loaded sample (it always has original_size)")
        return (ref[0] / original[0], ref[1] / original[1]), unit
    raise ValueError(f"{dataset.name}: unknown error unit {unit!r}")


def json_safe(value: Any) -> Any:
    """NaN -> null, inf -> "inf": metrics.json stays strict JSON (json.dumps allow_nan=False)."""
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): json_safe(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _cell(value: Any) -> str:
    """CSV cell: full-precision repr for floats (never rounded), empty for NaN."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "" if math.isnan(value) else repr(value)
    return str(value)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buf.getvalue()


def write_results(out_dir: str | Path, ids: Sequence[str], names: Sequence[str],
                  pred: np.ndarray, gt: np.ndarray, errors: np.ndarray,
                  summary: dict[str, Any], unit: str,
                  extra: Optional[dict[str, Any]] = None,
                  confidence: Optional[np.ndarray] = None,
                  extra_columns: Optional[dict[str, np.ndarray]] = None) -> dict[str, Path]:
    """Write metrics.json, per_landmark.csv and predictions.csv into `out_dir`, atomically.

    Coordinates are original pixels as given; in predictions.csv a missing coordinate is an
    empty cell, the error of a miss is "inf" and of a pair without ground truth empty.
    `extra` (e.g. decoder, checkpoint) is stored in metrics.json as is. `confidence` (N, K),
    when given, is one more predictions.csv column (the decoded heatmap peak), and so is each
    (N, K) array of `extra_columns` (uncertainty scores, conformal radii), under its key.
    """
    out_dir = Path(out_dir)
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    n, k = errors.shape
    if len(ids) != n or len(names) != k or pred.shape != (n, k, 2) or gt.shape != (n, k, 2):
        raise ValueError(f"inconsistent shapes: {len(ids)} ids, {len(names)} names, pred "
                         f"{pred.shape}, gt {gt.shape}, errors {errors.shape}")
    thresholds = summary["thresholds"]
    inclusive = summary.get("inclusive", True)
    table = per_landmark_table(errors, names, thresholds, inclusive)

    metrics = {"unit": unit, **summary,
               "policy": POLICY.format(unit=unit, op="<=" if inclusive else "<"),
               "per_landmark": table, **(extra or {})}
    paths = {"metrics": out_dir / "metrics.json", "per_landmark": out_dir / "per_landmark.csv",
             "predictions": out_dir / "predictions.csv"}
    atomic_write_text(paths["metrics"],
                      json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")

    header = list(table[0].keys()) if table else ["landmark_index", "name"]
    atomic_write_text(paths["per_landmark"],
                      csv_text(header, [[row[h] for h in header] for row in table]))

    rows = [[ids[i], j, names[j], pred[i, j, 0], pred[i, j, 1], gt[i, j, 0], gt[i, j, 1],
             errors[i, j], unit] for i in range(n) for j in range(k)]
    header = ["image", "landmark_index", "name", "x_pred", "y_pred", "x_gt", "y_gt", "error",
              "unit"]
    if confidence is not None:
        confidence = np.asarray(confidence, dtype=np.float64).reshape(n, k)
        header.append("confidence")
        rows = [row + [confidence[row_i // k, row_i % k]] for row_i, row in enumerate(rows)]
    for name, values in (extra_columns or {}).items():
        values = np.asarray(values).reshape(n, k)
        header.append(name)
        rows = [row + [values[row_i // k, row_i % k]] for row_i, row in enumerate(rows)]
    atomic_write_text(paths["predictions"], csv_text(header, rows))
    return paths
