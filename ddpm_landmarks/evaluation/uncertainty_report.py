"""How good are the uncertainty scores and the conformal regions on a labelled split.

    report = uncertainty_summary(errors, scales, radii, threshold=2.0, flag_radius=2.0)
    write_uncertainty(out_dir, report, landmark_names)
    # -> uncertainty.json, coverage_per_landmark.csv, sparsification.png
    print(format_uncertainty(report))

`errors` (N, K) in the dataset's unit with metrics.py's conventions (NaN = no ground truth,
+inf = missed); `scales` {score name: (N, K)} uncertainty scales, larger = less sure
(inference/uncertainty.py); `radii` {score: {alpha: (N, K)}} the conformal radii.

- Ranking (per score, over all image-landmark pairs with ground truth): ROC AUC of the scale
  for "error > threshold" (a miss is a large error; evaluation/classification_metrics.roc_auc,
  ties count one half), and the sparsification curve: the MRE of the points left after
  removing the fraction f most uncertain, f = 0, 0.01, ..., 0.99; the oracle removes the
  largest errors first; AUSE = the mean gap between the two (Ilg et al. 2018). "MRE drop" =
  how much lower the MRE of the rest is when `flagged_fraction` of the points are flagged.
  Ties in a scale are broken by position (image, then landmark), not at random.
- Regions (per score and alpha): empirical coverage overall and per landmark, the mean and
  median finite radius (efficiency: smaller is better at equal coverage), the number of
  infinite radii and the share of points whose radius exceeds `flag_radius`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm_landmarks.evaluation.classification_metrics import roc_auc
from ddpm_landmarks.evaluation.conformal import coverage
from ddpm_landmarks.evaluation.metrics import csv_text, json_safe
from ddpm_landmarks.utils.atomic import atomic_write_text

FRACTIONS = np.round(np.arange(0.0, 1.0, 0.01), 2)


def _mean_finite(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(v.mean()) if v.size else math.nan


def sparsification(errors: np.ndarray, order: np.ndarray,
                   fractions: Sequence[float] = FRACTIONS) -> np.ndarray:
    """MRE of the points kept after removing the first floor(f * M) of `order` (indices into
    the flat `errors` of M pairs), per fraction f; misses are excluded from each MRE."""
    ranked = np.asarray(errors, dtype=np.float64)[order]
    m = ranked.size
    return np.array([_mean_finite(ranked[int(math.floor(f * m + 1e-9)):]) for f in fractions])


def ranking_quality(errors: np.ndarray, scale: np.ndarray, threshold: float,
                    flagged_fraction: float) -> dict:
    """AUROC for error > threshold, sparsification curve and oracle, AUSE, MRE drop."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    u = np.asarray(scale, dtype=np.float64).ravel()
    keep = ~np.isnan(e)
    e, u = e[keep], u[keep]
    # Unknown (NaN) = least sure: above every known scale (roc_auc takes finite scores only).
    finite = u[np.isfinite(u)]
    u = np.where(np.isfinite(u), u, (finite.max() if finite.size else 0.0) + 1.0)
    by_scale = np.argsort(-u, kind="stable")
    by_error = np.argsort(-e, kind="stable")
    curve, oracle = sparsification(e, by_scale), sparsification(e, by_error)
    rest = sparsification(e, by_scale, [flagged_fraction])[0]
    overall = _mean_finite(e)
    return {"auroc": roc_auc(u, e > threshold), "ause": float(np.nanmean(curve - oracle)),
            "mre_all": overall, "mre_rest": rest,
            "mre_drop_percent": 100.0 * (overall - rest) / overall if overall else math.nan,
            "large_errors": int((e > threshold).sum()), "pairs": int(e.size),
            "curve": curve.tolist(), "oracle": oracle.tolist()}


def region_quality(errors: np.ndarray, radii: np.ndarray, flag_radius: float) -> dict:
    """Coverage (overall, per landmark), mean / median finite radius, infinite, flagged."""
    errors = np.asarray(errors, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)[~np.isnan(errors)]
    finite = r[np.isfinite(r)]
    return {**coverage(errors, radii),
            "mean_radius": float(finite.mean()) if finite.size else math.nan,
            "median_radius": float(np.median(finite)) if finite.size else math.nan,
            "infinite": int((~np.isfinite(r)).sum()),
            "flagged": float((r > flag_radius).mean()) if r.size else math.nan}


def uncertainty_summary(errors: np.ndarray, scales: dict[str, np.ndarray],
                        radii: Optional[dict[str, dict[float, np.ndarray]]], threshold: float,
                        flag_radius: float, flagged_fraction: float = 0.1,
                        primary: Optional[str] = None, unit: str = "mm") -> dict:
    """The report of the module doc as a dict (JSON-ready after metrics.json_safe)."""
    ranking = {name: ranking_quality(errors, s, threshold, flagged_fraction)
               for name, s in scales.items() if name != "none"}    # constant: nothing to rank
    regions = {name: {float(a): region_quality(errors, r, flag_radius) for a, r in by_alpha.items()}
               for name, by_alpha in (radii or {}).items()}
    return {"unit": unit, "threshold": float(threshold), "flag_radius": float(flag_radius),
            "flagged_fraction": float(flagged_fraction), "primary": primary,
            "fractions": FRACTIONS.tolist(), "ranking": ranking, "regions": regions}


def write_uncertainty(out_dir: str | Path, report: dict, names: Sequence[str]) -> dict[str, Path]:
    """uncertainty.json, coverage_per_landmark.csv (every calibrated score and alpha) and
    sparsification.png into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    paths = {"uncertainty": out_dir / "uncertainty.json"}
    atomic_write_text(paths["uncertainty"],
                      json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    if report["regions"]:
        header = ["landmark_index", "name"]
        columns = []
        for score, by_alpha in report["regions"].items():
            for alpha, q in by_alpha.items():
                header.append(f"coverage_{score}@{alpha:g}")
                columns.append(q["per_landmark"])
        rows = [[k, name] + [c[k] for c in columns] for k, name in enumerate(names)]
        paths["coverage"] = out_dir / "coverage_per_landmark.csv"
        atomic_write_text(paths["coverage"], csv_text(header, rows))
    if report["ranking"]:
        paths["sparsification"] = plot_sparsification(report, out_dir / "sparsification.png")
    return paths


def plot_sparsification(report: dict, path: Path) -> Path:
    """MRE of the remaining points vs the fraction removed, per score, with the oracle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_landmarks.utils.atomic import atomic_path

    fractions = 100.0 * np.asarray(report["fractions"])
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    oracle = None
    for name, r in report["ranking"].items():
        ax.plot(fractions, r["curve"], label=f"{name} (AUROC {r['auroc']:.2f})")
        oracle = r["oracle"]
    ax.plot(fractions, oracle, "k--", label="oracle (by true error)")
    first = next(iter(report["ranking"].values()))
    ax.axhline(first["mre_all"], color="0.6", lw=0.8, label="random (all points)")
    ax.set_xlabel("most uncertain points removed (%)")
    ax.set_ylabel(f"MRE of the remaining points ({report['unit']})")
    ax.set_title("sparsification")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def format_uncertainty(report: dict, regions: bool = True) -> str:
    """Markdown: coverage / radius per score and alpha (unless `regions` is False), then the
    ranking table."""
    unit, lines = report["unit"], []
    if report["regions"] and regions:
        lines += [f"conformal regions (radius in {unit}; flagged = radius > "
                  f"{report['flag_radius']:g} {unit})",
                  "| score | alpha | coverage | nominal | mean radius | median radius | "
                  "infinite | flagged |", "|---|---|---|---|---|---|---|---|"]
        for name, by_alpha in report["regions"].items():
            mark = " (used)" if name == report["primary"] else ""
            for alpha, q in by_alpha.items():
                lines.append(f"| {name}{mark} | {alpha:g} | {100 * q['overall']:.1f}% | "
                             f"{100 * (1 - alpha):.0f}% | {q['mean_radius']:.2f} | "
                             f"{q['median_radius']:.2f} | {q['infinite']} | "
                             f"{100 * q['flagged']:.1f}% |")
    if report["ranking"]:
        pct = 100 * report["flagged_fraction"]
        lines += ["", f"error ranking (large error: > {report['threshold']:g} {unit}; MRE of "
                  f"the rest with the {pct:g}% most uncertain flagged)",
                  "| score | AUROC | AUSE | MRE all | MRE rest | drop |",
                  "|---|---|---|---|---|---|"]
        for name, r in report["ranking"].items():
            lines.append(f"| {name} | {r['auroc']:.3f} | {r['ause']:.3f} | {r['mre_all']:.3f} | "
                         f"{r['mre_rest']:.3f} | {r['mre_drop_percent']:.1f}% |")
    return "\n".join(lines).strip()
