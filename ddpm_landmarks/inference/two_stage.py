"""Two-stage prediction: stage 1 (a HeatmapPredictor on the model grid) finds every landmark
roughly; a local network refines each one on a patch cut around it at a finer grid
(data/patches.py); every point goes back to ORIGINAL pixels through exact matrices (model grid
-> original for stage 1, patch -> original for stage 2), as floats.

    refiner = PatchRefiner(local_model, cfg, settings)          # cfg: the refinement run's
    predictor = TwoStagePredictor(stage1_predictor, refiner)
    out = predictor.predict(images, sources)     # stage-1 and final points in original pixels
    result = predict_samples(predictor, landmark_dataset, data_cfg)   # a whole split

A Source is what stage 2 needs of an image besides the model-grid input: the stored pixels,
the stored -> original and model grid -> original matrices and the original size (the file's
own for `predict`). Refinement of landmark k (iteration i = 1 .. iterations[k]):
  1. a refine.patch_size patch at refine.grid pixels across the image's long side, centred on
     the current point (stage 1's for i = 1), is cut from the stored image (one warp);
  2. the local network's channel k is its heatmap; with refine.prior_weight w > 0 the peak is
     chosen on the local heatmap times the stage-1 heatmap of landmark k resampled onto the
     patch to the power w (both clamped at 0) - context that keeps the point off look-alikes
     outside stage 1's blob - and located on the local heatmap around that peak alone;
  3. the decoded point is mapped back with the patch's exact inverse. No usable peak, or a
     point farther than the displacement limit from stage 1's, keeps the previous point.
All patches of a batch go through the local network in one forward (chunks of `chunk`,
256: a batch of 8 images has 110-135 shared patches at grid 512, and a small remainder costs more
per patch: on 2 CPU threads `patch_fold` takes 0.83 ms per patch at 12, 0.38 at 96;
`patch_lite` 1.34 and 0.95).
With refine.share_radius r > 0, landmarks of one image whose current points lie within r
patch pixels of a common centre share one patch (shared_patches: a greedy cover by discs
centred on a point or the midpoint of two), and each reads its own channel of it: fewer
forwards where landmarks cluster (a run trained with refine.supervise=visible, whose channels
know their landmark anywhere on a patch). The number of patches per image is
TwoStageOutput.patches.

Which landmarks are refined, and how often, is per landmark (RefineSettings.iterations: 0 =
stage 1 kept), chosen on validation images at the end of training (choose_iterations) and
stored in the run's refine.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ddpm_landmarks.data.patches import (
    cut_patch,
    on_patch_grid,
    patch_matrix,
    patch_pixel,
    shared_patches,
    stored_to_original,
)
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.data.transforms import LandmarkTransform, apply_matrix, warp_image
from ddpm_landmarks.heatmaps.decoders import decode
from ddpm_landmarks.heatmaps.outputs import outputs_to_heatmaps, softmax_region_size
from ddpm_landmarks.heatmaps.spread import spread_covariance
from ddpm_landmarks.inference.predictor import HeatmapPredictor, eval_mode

REFINE_FILE = "refine.json"
REFINE_FORMAT = "ddpm_landmarks.refine"


@dataclass
class Source:
    """One image as stage 2 sees it (module doc)."""
    image: np.ndarray                  # float32 (H, W) stored pixels in [0, 1]
    to_original: np.ndarray            # 3x3 stored pixels -> original pixels
    model_to_original: np.ndarray      # 3x3 model grid -> original pixels
    original_wh: tuple[int, int]


@dataclass
class RefineSettings:
    """Per-landmark iterations (0 = keep stage 1) and the displacement limit in patch pixels
    (None = none): refine.json of a run, or the run config's refine section."""
    iterations: list[int]
    max_shift_px: Optional[float] = None
    unit_per_patch_pixel: Optional[float] = None   # for reports: the patch pixel in the unit

    @classmethod
    def uniform(cls, num_landmarks: int, iterations: int, max_shift: Optional[float] = None,
                unit_per_patch_pixel: Optional[float] = None) -> "RefineSettings":
        """Every landmark `iterations` times; max_shift in the dataset's unit."""
        limit = None
        if max_shift is not None:
            if not unit_per_patch_pixel:
                raise ValueError("refine.max_shift needs the size of a patch pixel in the unit")
            limit = max_shift / unit_per_patch_pixel
        return cls([int(iterations)] * num_landmarks, limit, unit_per_patch_pixel)


@dataclass
class TwoStageOutput:
    """Points per image and landmark in original pixels; history[i] = after i refinements
    (history[0] = stage 1), every landmark refined up to max(iterations)."""
    stage1: np.ndarray                 # (B, K, 2)
    final: np.ndarray                  # (B, K, 2)
    stage1_peak: np.ndarray            # (B, K)
    final_peak: np.ndarray             # (B, K): the refined point's decoded peak, else stage 1's
    history: list[np.ndarray] = field(default_factory=list)
    # Of the last refinement of each landmark (NaN where not refined): patch -> original
    # matrices and the decoded patch heatmaps, for uncertainty estimates.
    patch_to_original: Optional[np.ndarray] = None   # (B, K, 3, 3)
    patch_maps: Optional[np.ndarray] = None          # (B, K, P, P)
    # With TwoStagePredictor(spread=...): the heatmap spread behind each final point, for the
    # uncertainty scores (inference/uncertainty.py two_stage_scales): stage 1's on the model
    # grid with the grid -> original matrices, the local map's in patch pixels (NaN where the
    # final point is stage 1's).
    stage1_covariance: Optional[np.ndarray] = None   # (B, K, 2, 2) model-grid px^2
    model_to_original: Optional[np.ndarray] = None   # (B, 3, 3)
    patch_covariance: Optional[np.ndarray] = None    # (B, K, 2, 2) patch px^2
    # Patches through the local network per image, all iterations (the cost of stage 2).
    patches: Optional[np.ndarray] = None             # (B,) int


class PatchRefiner:
    """The local network of a refinement run and how it is applied (module doc)."""

    def __init__(self, model: torch.nn.Module, cfg, settings: RefineSettings,
                 flip_permutation: Optional[Sequence[int]] = None, flip_tta: bool = False,
                 device: Optional[torch.device | str] = None, chunk: int = 256):
        if flip_tta and flip_permutation is None:
            raise ValueError("flip test-time augmentation needs the dataset's left/right landmark "
                             "permutation; this dataset has none (set eval.flip_tta=false)")
        self.model, self.settings, self.chunk = model, settings, int(chunk)
        self.conditioned = getattr(getattr(model, "cfg", None), "landmark_embedding", 0) > 0
        self.size, self.grid = int(cfg.refine.patch_size), int(cfg.refine.grid)
        self.prior_weight = float(cfg.refine.prior_weight)
        self.share_radius = float(cfg.refine.share_radius)
        # Radius of the local peak the prior chooses: 2 sigma of the local targets.
        self.window = 2.0 * (cfg.heatmap.sigma if cfg.heatmap.kind == "gaussian"
                             else cfg.heatmap.disc_radius)
        self.loss_name = cfg.loss.name
        self.region_size = (softmax_region_size(cfg.heatmap, cfg.loss.softmax_threshold)
                            if cfg.loss.name == "softmax_ce" else 1)
        self.decoder_cfg = cfg.decoder
        self.flip_tta = flip_tta
        self.permutation = None if flip_permutation is None else list(flip_permutation)
        self.device = torch.device(device) if device is not None else next(
            model.parameters()).device

    def local_heatmaps(self, patches: np.ndarray, landmarks: np.ndarray,
                       patch_of: Optional[np.ndarray] = None) -> np.ndarray:
        """(m, P, P) patches in [0, 1], landmarks (n,) and the patch each is read on (n,)
        (None: landmark n on patch n) -> (n, P, P) heatmaps (channel k of the local network;
        flip TTA: averaged with the mirrored patch read at the mirror landmark's channel).
        Each patch goes through the network once, however many landmarks it shows."""
        landmarks = np.asarray(landmarks, dtype=np.int64)
        patch_of = np.arange(len(landmarks)) if patch_of is None else np.asarray(patch_of)
        out = np.zeros((len(landmarks), self.size, self.size), np.float32)
        with eval_mode(self.model):
            for start in range(0, len(patches), self.chunk):
                stop = min(start + self.chunk, len(patches))
                rows = np.nonzero((patch_of >= start) & (patch_of < stop))[0]
                if not len(rows):
                    continue
                x = torch.from_numpy(patches[start:stop] * 2.0 - 1.0)[:, None]
                x = x.to(self.device, torch.float32)
                which = torch.as_tensor(patch_of[rows] - start, dtype=torch.long)
                ks = torch.as_tensor(landmarks[rows], dtype=torch.long)
                own = self._channel(x, which, ks)
                if self.flip_tta:
                    partner = torch.as_tensor([self.permutation[int(k)] for k in ks])
                    mirrored = self._channel(torch.flip(x, dims=[-1]), which, partner)
                    own = 0.5 * (own + torch.flip(mirrored, dims=[-1]))
                out[rows] = own.float().numpy()
        return out

    def _channel(self, x: torch.Tensor, which: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """(n, P, P) heatmaps of landmarks ks on patches x[which]: channel k of the K outputs,
        or the one output of a landmark-conditioned network given k."""
        if self.conditioned:
            out = self.model(x[which], ks.to(x.device))
            which, ks = torch.arange(len(ks)), torch.zeros_like(ks)
        else:
            out = self.model(x)
        maps = outputs_to_heatmaps(out, self.loss_name, self.region_size).cpu()
        return maps[which, ks]

    def apply_prior(self, maps: np.ndarray, priors: np.ndarray) -> np.ndarray:
        """The local maps (n, P, P) restricted to a disc of radius window around the peak of
        local x prior^w: the prior picks WHICH peak (context), the local map alone says where
        it is (a product would pull the point towards stage 1's). Outside the disc: the map's
        minimum."""
        score = np.maximum(maps, 0.0) * np.maximum(priors, 0.0) ** self.prior_weight
        n, h, w = maps.shape
        peak = score.reshape(n, -1).argmax(axis=1)
        py, px = np.divmod(peak, w)
        ys, xs = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        inside = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 <= self.window ** 2
        floor = maps.reshape(n, -1).min(axis=1)[:, None, None]
        return np.where(inside, maps, floor)

    def refine(self, stage1_maps: np.ndarray, stage1: np.ndarray, stage1_peak: np.ndarray,
               sources: Sequence[Source], explore: bool = False) -> TwoStageOutput:
        """Refine stage-1 points (B, K, 2) (original pixels) given stage 1's heatmaps
        (B, K, S, S) on the model grid and the images' sources. explore=True refines every
        landmark max(iterations) times (the history to choose from); the final points are
        still each landmark's own number of iterations."""
        b, k = stage1.shape[:2]
        wanted = np.asarray(self.settings.iterations, dtype=np.int64)
        if wanted.shape != (k,):
            raise ValueError(f"refine settings are for {len(wanted)} landmarks, stage 1 "
                             f"predicts {k}")
        current, peak = stage1.copy(), stage1_peak.astype(np.float64).copy()
        history = [stage1.copy()]
        last_matrix = np.full((b, k, 3, 3), np.nan)
        last_maps = np.full((b, k, self.size, self.size), np.nan, dtype=np.float32)
        final, final_peak = stage1.copy(), peak.copy()
        patches = np.zeros(b, dtype=np.int64)
        # Each image once on the patch grid: no antialiasing resize per patch.
        sources = [Source(*on_patch_grid(s.image, s.to_original, s.original_wh, self.grid),
                          s.model_to_original, s.original_wh) for s in sources]
        for it in range(int(wanted.max(initial=0))):
            todo = [(i, j) for i in range(b) for j in range(k)
                    if (explore or wanted[j] > it) and np.isfinite(current[i, j]).all()]
            if todo:
                self._step(todo, current, peak, stage1, stage1_maps, sources, last_matrix,
                           last_maps, patches)
            history.append(current.copy())
            chosen = wanted == it + 1
            final[:, chosen], final_peak[:, chosen] = current[:, chosen], peak[:, chosen]
        not_refined = wanted == 0
        last_matrix[:, not_refined], last_maps[:, not_refined] = np.nan, np.nan
        return TwoStageOutput(stage1.copy(), final, stage1_peak.astype(np.float64), final_peak,
                              history, last_matrix, last_maps, patches=patches)

    def _step(self, todo, current, peak, stage1, stage1_maps, sources, last_matrix,
              last_maps, patches_per_image) -> None:
        """One refinement of the (image, landmark) pairs `todo`, in place."""
        matrices, patches, patch_of = [], [], np.zeros(len(todo), dtype=np.int64)
        for i in sorted({i for i, _ in todo}):
            rows = [n for n, (ii, _) in enumerate(todo) if ii == i]
            src = sources[i]
            pixel = patch_pixel(src.original_wh, self.grid)
            points = np.stack([current[i, todo[n][1]] for n in rows])
            centres, member = shared_patches(points, self.share_radius * pixel)
            patch_of[rows] = len(matrices) + member
            for centre in centres:
                m = patch_matrix(centre, pixel, self.size)
                matrices.append(m)
                patches.append(cut_patch(src.image, src.to_original, m, self.size))
            patches_per_image[i] += len(centres)
        maps = self.local_heatmaps(np.stack(patches).astype(np.float32),
                                   np.array([j for _, j in todo]), patch_of)
        if self.prior_weight > 0:
            priors = [warp_image(np.asarray(stage1_maps[i, j], np.float32),
                                 matrices[patch_of[n]] @ sources[i].model_to_original,
                                 self.size) for n, (i, j) in enumerate(todo)]
            maps = self.apply_prior(maps, np.stack(priors))
        points, conf = decode(maps[:, None], self.decoder_cfg)
        points, conf = points[:, 0], conf[:, 0]
        inverses = [np.linalg.inv(m) for m in matrices]           # patch -> original, per patch
        for n, (i, j) in enumerate(todo):
            if not np.isfinite(points[n]).all():
                continue
            back = inverses[patch_of[n]]
            moved = apply_matrix(back, points[n])
            limit = self.settings.max_shift_px
            if limit is not None:
                # Distance to the stage-1 point in patch pixels (the patch grid is isotropic).
                pixel = patch_pixel(sources[i].original_wh, self.grid)
                if np.hypot(*(moved - stage1[i, j])) / pixel > limit:
                    continue
            current[i, j], peak[i, j] = moved, conf[n]
            last_matrix[i, j], last_maps[i, j] = back, maps[n]


@dataclass(frozen=True)
class SpreadSettings:
    """How TwoStagePredictor measures heatmap spread (heatmaps/spread.py): the method and the
    window half-widths on stage 1's grid and on the patch."""
    method: str
    stage1_window: int
    patch_window: int


class TwoStagePredictor:
    """Stage 1 + PatchRefiner: predict(images, sources) -> TwoStageOutput (with the spread
    of the heatmaps behind the final points when `spread` is given)."""

    def __init__(self, stage1: HeatmapPredictor, refiner: PatchRefiner,
                 spread: Optional[SpreadSettings] = None):
        self.stage1, self.refiner, self.spread = stage1, refiner, spread

    def predict(self, images: torch.Tensor, sources: Sequence[Source],
                explore: bool = False) -> TwoStageOutput:
        """(B, 1, S, S) model-grid images in [-1, 1] and their Sources (explore: see
        PatchRefiner.refine)."""
        maps = self.stage1.heatmaps(images)
        points, peak = decode(maps, self.stage1.decoder_cfg)
        stage1 = np.stack([apply_matrix(s.model_to_original, p) for s, p in zip(sources, points)])
        out = self.refiner.refine(maps.numpy(), stage1, peak, sources, explore)
        if self.spread is not None:
            out.stage1_covariance = spread_covariance(maps, self.spread.method,
                                                      self.spread.stage1_window)
            out.model_to_original = np.stack([s.model_to_original for s in sources])
            out.patch_covariance = patch_spread(out.patch_maps, self.spread)
        return out


def patch_spread(patch_maps: np.ndarray, spread: SpreadSettings) -> np.ndarray:
    """(B, K, 2, 2) spread of the refined points' patch heatmaps; NaN where not refined."""
    b, k = patch_maps.shape[:2]
    out = np.full((b, k, 2, 2), np.nan)
    refined = np.isfinite(patch_maps).all(axis=(-2, -1))
    if refined.any():
        maps = torch.from_numpy(np.ascontiguousarray(patch_maps[refined]))[:, None]
        out[refined] = spread_covariance(maps, spread.method, spread.patch_window)[:, 0]
    return out


# ----------------------------------------------------------------------------------------------
# Whole datasets
# ----------------------------------------------------------------------------------------------

def model_input(sample, transform: LandmarkTransform) -> tuple[torch.Tensor, Source]:
    """(model-grid tensor (1, S, S) in [-1, 1], Source) of a LandmarkSample: the same input
    as HeatmapDataset(train=False)."""
    t = transform(sample)
    tensor = torch.from_numpy(t.image * 2.0 - 1.0).unsqueeze(0)
    return tensor, Source(sample.image, stored_to_original(sample), t.to_original,
                          tuple(sample.original_size))


@dataclass
class DatasetPrediction:
    indices: list[int]
    output: TwoStageOutput             # arrays over the whole dataset (N, ...)


def predict_samples(predictor: TwoStagePredictor, dataset: LandmarkDataset, data_cfg,
                    augment_cfg, batch_size: int = 16, indices: Optional[Sequence[int]] = None,
                    explore: bool = False) -> DatasetPrediction:
    """Both stages over `dataset` (all items or `indices`), in batches."""
    transform = LandmarkTransform(data_cfg, augment_cfg, dataset.flip_permutation, train=False,
                                  dataset_name=dataset.name)
    chosen = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    parts = []
    for start in range(0, len(chosen), batch_size):
        inputs = [model_input(dataset[i], transform) for i in chosen[start:start + batch_size]]
        parts.append(predictor.predict(torch.stack([x for x, _ in inputs]),
                                       [s for _, s in inputs], explore))
    return DatasetPrediction(chosen, concat_outputs(parts))


def concat_outputs(parts: Sequence[TwoStageOutput]) -> TwoStageOutput:
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)
    steps = min(len(p.history) for p in parts)
    return TwoStageOutput(cat("stage1"), cat("final"), cat("stage1_peak"), cat("final_peak"),
                          [np.concatenate([p.history[i] for p in parts]) for i in range(steps)],
                          cat("patch_to_original"), cat("patch_maps"), cat("stage1_covariance"),
                          cat("model_to_original"), cat("patch_covariance"), cat("patches"))


# ----------------------------------------------------------------------------------------------
# Per-landmark choice on validation images, and the run's refine.json
# ----------------------------------------------------------------------------------------------

def choose_iterations(errors_by_iteration: np.ndarray) -> list[int]:
    """(I + 1, N, K) errors after 0..I refinements (0 = stage 1) -> per landmark the number
    of refinements with the lowest mean error over the images (ties: the fewer)."""
    e = np.asarray(errors_by_iteration, dtype=np.float64)
    # A miss (inf) counts as a large error, not as an undefined one.
    e = np.where(np.isinf(e), 1e9, e)
    means = np.nanmean(e, axis=1)                                    # (I + 1, K)
    means = np.where(np.isnan(means), np.inf, means)
    return [int(np.argmin(means[:, j])) for j in range(e.shape[2])]


def write_refine_file(run_dir: Path, content: dict) -> Path:
    from ddpm_landmarks.utils.atomic import atomic_write_text
    path = Path(run_dir) / REFINE_FILE
    atomic_write_text(path, json.dumps({"format": REFINE_FORMAT, "version": 1, **content},
                                       indent=2) + "\n")
    return path


def read_refine_file(run_dir: Path) -> Optional[dict]:
    """refine.json of a refinement run (None when the run wrote none yet); ValueError when
    it is not one."""
    path = Path(run_dir) / REFINE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != REFINE_FORMAT or data.get("version") != 1:
        raise ValueError(f"{path}: not a refine file of this version ({REFINE_FORMAT} v1)")
    return data
