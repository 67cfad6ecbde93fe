"""A run's conformal calibration: the file `ddpm-landmarks calibrate` writes into the run
folder, and how evaluate / predict turn it into per-point radii.

    cal = fit_calibration(errors, scales, alphas, uncertainty_cfg, model_settings, draw, unit)
    save_calibration(cal, run_dir)          # RUN/calibration.json + RUN/calibration_ids.txt
    cal = load_calibration(run_dir)         # None when the run has none
    why = cal.mismatch(model_settings)      # "" when it applies to this model and decoding
    radii = cal.radii(scales)               # {score: {alpha: (N, K)}} in cal.unit
    file_regions(cal, grid, to_files, sizes, spacing, flag_radius)   # predict: in file units

calibration.json (strict JSON; an infinite q is the string "inf"):
    format "ddpm_landmarks.calibration", version 1
    dataset, pool_split, unit          the error unit of the radii (mm, px, px@WxH)
    draw                               seed, count, pool size, excluded (few-shot train + val)
    ids                                the calibration images (also calibration_ids.txt)
    alphas, score                      miscoverage levels; the score predict / evaluate use
    uncertainty                        the score settings (spread method, window, floor, TTA):
                                       evaluate / predict compute the scores with THESE, since
                                       the guarantee holds for the score function calibrated
    model                              what must not change: weights (sha256), decoder, flip
                                       TTA, grid, heatmap, loss
    tta_views                          views of the tta score (0 when it was not computed)
    counts                             n_k calibration pairs per landmark
    error_summary                      MRE, SD, median, n, missed of the calibration images
    quantiles                          {score: {alpha: [q_k]}} for every score computed
    guarantee                          the statement and its conditions (evaluation/conformal.py)
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ddpm_landmarks.config.common import UncertaintyConfig
from ddpm_landmarks.config.schema import from_dict, to_dict
from ddpm_landmarks.evaluation.conformal import fit_quantiles, region_radii
from ddpm_landmarks.evaluation.metrics import json_safe
from ddpm_landmarks.heatmaps.spread import auto_window
from ddpm_landmarks.inference.uncertainty import LENGTH_SCORES
from ddpm_landmarks.models.artifacts import FORMATS
from ddpm_landmarks.utils.atomic import atomic_write_text

FILE = "calibration.json"
IDS_FILE = "calibration_ids.txt"
FORMAT = "ddpm_landmarks.calibration"
VERSION = 1
GUARANTEE = ("split conformal, per landmark: P(error <= radius) >= 1 - alpha for a test image "
             "exchangeable with the calibration images (same pool and distribution; model and "
             "score fixed before calibration), marginally, finite-sample; radius = q_k(alpha) x "
             "the image's score scale, q_k = the ceil((n_k + 1)(1 - alpha))-th smallest "
             "calibration error / scale; infinite when that rank exceeds n_k")
# Score settings a calibration fixes (UncertaintyConfig fields); the rest (alphas, flag
# radius, error threshold, calibration draw) are the user's at evaluation time.
SCORE_FIELDS = ("spread", "window", "score_floor", "tta_jitters", "tta_rotation_deg",
                "tta_scale", "tta_translate", "tta_flip", "tta_seed")


def weights_digest(weights_dir: Path) -> str:
    """sha256 of a saved regressor's weights file: a calibration belongs to these weights."""
    digest = hashlib.sha256()
    with open(Path(weights_dir) / FORMATS["regressor"].weights_file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_settings(cfg, weights_dir: Path, flip_tta: bool,
                   stage1_dir: Optional[Path] = None) -> dict:
    """What the scores and errors depend on besides the score settings (compared on use); a
    refinement run also its stage-1 weights and refine section."""
    settings = {"weights_sha256": weights_digest(weights_dir), "decoder": to_dict(cfg.decoder),
                "flip_tta": bool(flip_tta), "image_size": int(cfg.data.image_size),
                "resize_mode": cfg.data.resize_mode, "heatmap": to_dict(cfg.heatmap),
                "loss": to_dict(cfg.loss)}
    if stage1_dir is not None:
        settings.update(stage1_sha256=weights_digest(stage1_dir), refine=to_dict(cfg.refine))
    return settings


def score_settings(cfg: UncertaintyConfig, heatmap_cfg) -> UncertaintyConfig:
    """cfg with the window resolved (0 = auto): the value stored and reused."""
    return dataclasses.replace(cfg, window=cfg.window or auto_window(heatmap_cfg))


def _number(value) -> float:
    return math.inf if value == "inf" else float(value)


@dataclass
class Calibration:
    dataset: str
    pool_split: str
    unit: str
    draw: dict
    ids: list[str]
    alphas: list[float]
    score: str
    uncertainty: UncertaintyConfig
    model: dict
    counts: list[int]
    quantiles: dict[str, dict[float, np.ndarray]]     # score -> alpha -> (K,)
    tta_views: int = 0                                 # views of the tta score (0: not computed)
    error_summary: dict = dataclasses.field(default_factory=dict)   # MRE etc. of the images
    created: str = ""

    def mismatch(self, settings: dict) -> str:
        """"" when `settings` (model_settings of the evaluating run) equal the calibrated
        ones, else which differ."""
        settings = json_safe(settings)                 # as stored: -inf -> "-inf"
        differ = [k for k in sorted(set(self.model) | set(settings))
                  if self.model.get(k) != settings.get(k)]
        return ", ".join(differ)

    @property
    def needs_tta(self) -> bool:
        return "tta" in self.quantiles

    def scoring(self, user: UncertaintyConfig) -> UncertaintyConfig:
        """The user's config (alphas aside) with this calibration's score settings."""
        fixed = {f: getattr(self.uncertainty, f) for f in SCORE_FIELDS}
        return dataclasses.replace(user, score=self.score, tta=self.needs_tta, **fixed)

    def radii(self, scales: dict[str, np.ndarray]) -> dict[str, dict[float, np.ndarray]]:
        """{score: {alpha: (N, K) radius}} for every calibrated score present in `scales`."""
        return {name: {a: region_radii(q, scales[name]) for a, q in by_alpha.items()}
                for name, by_alpha in self.quantiles.items() if name in scales}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created,
                "dataset": self.dataset, "pool_split": self.pool_split, "unit": self.unit,
                "draw": self.draw, "ids": list(self.ids), "alphas": list(self.alphas),
                "score": self.score, "uncertainty": to_dict(self.uncertainty),
                "model": self.model, "tta_views": self.tta_views, "counts": list(self.counts),
                "error_summary": self.error_summary,
                "quantiles": {name: {a: q.tolist() for a, q in by_alpha.items()}
                              for name, by_alpha in self.quantiles.items()},
                "guarantee": GUARANTEE}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Calibration":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{where}: not a calibration file of this version (format "
                             f"{data.get('format')!r} version {data.get('version')!r}; expected "
                             f"{FORMAT!r} version {VERSION})")
        quantiles = {name: {float(a): np.array([_number(v) for v in q]) for a, q in by.items()}
                     for name, by in data["quantiles"].items()}
        return cls(data["dataset"], data["pool_split"], data["unit"], data["draw"],
                   list(data["ids"]), [float(a) for a in data["alphas"]], data["score"],
                   from_dict(UncertaintyConfig, data["uncertainty"], "uncertainty."),
                   data["model"], [int(n) for n in data["counts"]], quantiles,
                   int(data["tta_views"]), dict(data.get("error_summary") or {}),
                   data.get("created", ""))


def fit_calibration(errors: np.ndarray, scales: dict[str, np.ndarray], alphas: Sequence[float],
                    uncertainty: UncertaintyConfig, model: dict, draw: dict, ids: Sequence[str],
                    dataset: str, pool_split: str, unit: str, tta_views: int = 0) -> Calibration:
    """q_k(alpha) for every score in `scales` from calibration errors (N, K) in `unit`."""
    if uncertainty.score not in scales:
        raise ValueError(f"uncertainty.score={uncertainty.score} was not computed (the tta score "
                         f"needs test-time augmentation)")
    quantiles, counts = {}, None
    for name, u in scales.items():
        quantiles[name], counts = fit_quantiles(errors, u, alphas)
    return Calibration(dataset, pool_split, unit, draw, list(ids), [float(a) for a in alphas],
                       uncertainty.score, uncertainty, json_safe(model), [int(n) for n in counts],
                       quantiles, int(tta_views), {},
                       datetime.datetime.now().isoformat(timespec="seconds"))


def save_calibration(cal: Calibration, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / IDS_FILE, "".join(f"{i}\n" for i in cal.ids))
    path = run_dir / FILE
    atomic_write_text(path, json.dumps(json_safe(cal.to_json()), indent=2,
                                       allow_nan=False) + "\n")
    return path


def load_calibration(run_dir: str | Path) -> Optional[Calibration]:
    """The run's calibration, None when it has none; ValueError naming the file if broken."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text()), str(path))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable calibration ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------
# In a predicted file's units (predict: the file is its own original grid)
# ----------------------------------------------------------------------------------------------

def file_unit_scale(unit: str, size: tuple[int, int],
                    spacing: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """Error unit per file pixel (x, y), the file being its own original grid: (1, 1) for
    pixels, reference / file size for px@WxH, `spacing` for mm (None when unknown)."""
    if unit == "px":
        return 1.0, 1.0
    if unit.startswith("px@"):
        ref = [int(v) for v in unit[3:].lower().split("x")]
        return ref[0] / size[0], ref[1] / size[1]
    return None if spacing is None else (float(spacing[0]), float(spacing[1]))


def file_regions(calibration, scales_for: Callable[[np.ndarray], dict],
                 sizes: Sequence[tuple[int, int]], spacing, flag_radius: float
                 ) -> list[tuple[dict, str, dict, Optional[np.ndarray]]]:
    """Per image of a batch (`scales_for(unit per file pixel (B, 2))` -> the score scales,
    e.g. inference/uncertainty.py score_scales of the batch's estimates; the file sizes):
    ({alpha: radius (K,)}, radius unit, {alpha: radius > flag_radius (K,)}, region semi-axes
    (K, 2) in file pixels or None). With the file's unit scale known, radii are in the
    calibration's unit; without (mm, no spacing), a length score (spread, tta) is measured in
    file pixels - its q is a pure number - so the radius is in px and there is no flag (the
    threshold is in mm); a none / peak radius is q in mm itself, kept, but cannot be drawn."""
    known = [file_unit_scale(calibration.unit, wh, spacing) for wh in sizes]
    unit_scale = np.array([k or (1.0, 1.0) for k in known])
    scales = scales_for(unit_scale)
    radii = calibration.radii(scales)[calibration.score]
    length = calibration.score in LENGTH_SCORES
    out = []
    for i, k in enumerate(known):
        mine = {a: r[i] for a, r in radii.items()}
        first = mine[calibration.alphas[0]][:, None]
        if k is not None:               # in the calibration's unit; exact per-axis pixels
            out.append((mine, calibration.unit,
                        {a: r > flag_radius for a, r in mine.items()}, first / np.array(k)))
        elif length:                    # measured in the file's pixels all along
            out.append((mine, "px", {}, np.repeat(first, 2, axis=1)))
        else:                           # q in the calibration's unit, pixels unknown
            out.append((mine, calibration.unit,
                        {a: r > flag_radius for a, r in mine.items()}, None))
    return out
