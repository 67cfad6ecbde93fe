"""How well a pretrained network's FROZEN features suit a landmark task, without fine-tuning:
LogME (You et al., ICML 2021) adapted to heatmap regression, an optional H-score, and the two
pieces of the source filters (SSIM of mean label maps) and of the validation (Spearman).

    task = labelled_task(items, ids, feature_size=64, foreground_threshold=0.1,
                         background_ratio=1.0, seed=0)
    stats, partial = feature_statistics(features_fn, task, batch_size=16, device="cpu")
    result = logme_score(stats, partial, task)       # {"score", "per_landmark", ...}

Features: the hypercolumn of the pretraining landmark probe (training/probe.py): each
method's own maps (methods/ddpm.unet_decoder_features: the U-Net's decoder blocks at t = 0;
methods/ssl_base.encoder_stage_features: an smp encoder's five stages), put on ONE grid by
probe.resize_features. Unlike the probe, every candidate is put on the same g x g grid
(g = min(feature_size, image size)): LogME values are only comparable between candidates when
they are computed on the same samples and targets.

The adaptation of LogME to heatmap regression:
  * a sample is one pixel of the g x g grid of one labelled image; its features are the
    hypercolumn there, standardised per channel over the samples (hypercolumns stack layers of
    very different scales, and LogME's prior is isotropic); the targets are the K Gaussian
    heatmaps of the task (heatmap.sigma on the model grid, area-averaged to the feature grid,
    as the probe does), centred per landmark (a bias with a flat prior);
  * pixels: every FOREGROUND pixel of an image (some present landmark's target above
    loss.foreground_threshold: where the heatmap loss weighs most) plus a seeded draw of
    round(background_ratio x that count) background pixels, drawn with a generator seeded by
    (seed, crc32(image id)): the same pixels for every candidate, independent of the order of
    the images. The cost is bounded by the foreground area, not by the grid;
  * each landmark k is one Bayesian linear regression y_k = F w + e, w ~ N(0, I / alpha),
    e ~ N(0, I / beta); alpha and beta maximise the evidence by LogME's fixed-point updates
    (gamma = sum s_i / (s_i + alpha / beta), alpha = gamma / |m|^2, beta = (n - gamma) /
    |y - F m|^2); the score is the maximum log evidence per sample, averaged over landmarks.
    Images where landmark k is missing are left out of its regression;
  * LogME works on the SVD of F (n x D). Here only F's sufficient statistics are kept (F^T F,
    F^T y, sums: streamed image by image in float64), and the eigen-decomposition of the
    standardised F^T F gives the same quantities (its eigenvalues are the squared singular
    values, V^T F^T y = s * U^T y), so memory is D^2 whatever the number of pixels. One
    decomposition serves every landmark when no landmark is missing.
Higher LogME = more transferable. It is the default: it scores the continuous Gaussian
targets the `mse` loss trains on, and the evidence penalises wide feature sets (hypercolumns
differ from 224 to 1000+ channels), where the H-score grows with the dimension.

H-score (Bao et al., ICIP 2019), `score=hscore`: tr(cov(f)^-1 cov(E[f | c])) with pixel
classes c = the landmark whose target is largest where it is above the foreground threshold,
else background (the released code's channel_ce classes); the covariance is shrunk towards the
identity, (1 - lambda) R + lambda I on standardised features (Ibrahim et al., ICLR 2023), since
the hypercolumn's correlation matrix is near singular.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_landmarks.training.probe import resize_features

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]

__all__ = ["LabelledTask", "FeatureStats", "labelled_task", "sample_pixels",
           "feature_statistics", "log_evidence", "logme_fit", "logme_score", "hscore",
           "ssim", "mean_label_map", "average_ranks", "spearman"]


# ----------------------------------------------------------------------------------------------
# The target task: labelled images and the pixels they are scored at
# ----------------------------------------------------------------------------------------------

@dataclass
class LabelledTask:
    images: torch.Tensor           # (N, 1, S, S) in [-1, 1], the model grid
    heatmaps: torch.Tensor         # (N, K, S, S) Gaussian targets on the model grid
    mask: torch.Tensor             # (N, K) bool: landmark present
    ids: list[str]
    grid: int                      # g: features and targets on g x g
    pixels: list[torch.Tensor]     # per image: flat indices into the g x g grid (sorted)
    targets: list[torch.Tensor]    # per image: (n_i, K) float64 targets at those pixels
    classes: list[torch.Tensor]    # per image: (n_i,) landmark of the pixel, K = background

    @property
    def num_landmarks(self) -> int:
        return int(self.heatmaps.shape[1])

    @property
    def num_samples(self) -> int:
        return int(sum(len(p) for p in self.pixels))


def sample_pixels(targets: torch.Tensor, present: torch.Tensor, threshold: float,
                  background_ratio: float, seed: int, image_id: str) -> torch.Tensor:
    """Flat indices of the sampled pixels of one image's (K, g, g) targets: every pixel where a
    present landmark's target exceeds `threshold`, plus round(background_ratio x their count)
    of the other pixels, drawn by a generator seeded with (seed, crc32(image_id))."""
    flat = targets[present.bool()].flatten(1)                      # (K_present, g*g)
    if flat.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    foreground = flat.max(dim=0).values > threshold
    fg = torch.nonzero(foreground).flatten().numpy()
    bg_all = torch.nonzero(~foreground).flatten().numpy()
    count = min(len(bg_all), int(round(background_ratio * len(fg))))
    rng = np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode())])
    bg = rng.choice(bg_all, size=count, replace=False) if count else np.zeros(0, np.int64)
    return torch.from_numpy(np.sort(np.concatenate([fg, bg]).astype(np.int64)))


def labelled_task(batch: dict, ids: Sequence[str], feature_size: int,
                  foreground_threshold: float, background_ratio: float,
                  seed: int) -> LabelledTask:
    """The task of a collated batch of HeatmapDataset items ({"image", "heatmaps", "mask"})."""
    images, heatmaps, mask = batch["image"], batch["heatmaps"].float(), batch["mask"].bool()
    size = int(heatmaps.shape[-1])
    grid = min(int(feature_size), size)
    if grid < 1:
        raise ValueError(f"feature_size must be >= 1, got {feature_size}")
    if not background_ratio >= 0:
        raise ValueError(f"background_ratio must be >= 0, got {background_ratio}")
    on_grid = heatmaps if grid == size else F.adaptive_avg_pool2d(heatmaps, (grid, grid))
    pixels, targets, classes = [], [], []
    k = heatmaps.shape[1]
    for i, image_id in enumerate(ids):
        idx = sample_pixels(on_grid[i], mask[i], foreground_threshold, background_ratio, seed,
                            image_id)
        y = on_grid[i].flatten(1)[:, idx].T.double() * mask[i].double()   # (n_i, K)
        top, which = y.max(dim=1)
        pixels.append(idx)
        targets.append(y)
        classes.append(torch.where(top > foreground_threshold, which, torch.full_like(which, k)))
    return LabelledTask(images=images, heatmaps=heatmaps, mask=mask, ids=list(ids), grid=grid,
                        pixels=pixels, targets=targets, classes=classes)


# ----------------------------------------------------------------------------------------------
# Sufficient statistics of the features at the sampled pixels
# ----------------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Sums over samples of f (D), f f^T, f y^T (y: K targets), y, y^2 and per-class sums of f
    (K + 1 classes, the last = background), float64. Adding / subtracting combines sets."""
    n: float
    gram: torch.Tensor             # (D, D)
    f_sum: torch.Tensor            # (D,)
    fy: torch.Tensor               # (D, K)
    y_sum: torch.Tensor            # (K,)
    yy: torch.Tensor               # (K,)
    class_sum: torch.Tensor        # (K + 1, D)
    class_n: torch.Tensor          # (K + 1,)

    @staticmethod
    def of(f: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> "FeatureStats":
        f, y = f.double(), y.double()
        one_hot = F.one_hot(classes, y.shape[1] + 1).double()
        return FeatureStats(n=float(f.shape[0]), gram=f.T @ f, f_sum=f.sum(0), fy=f.T @ y,
                            y_sum=y.sum(0), yy=(y * y).sum(0), class_sum=one_hot.T @ f,
                            class_n=one_hot.sum(0))

    def _combine(self, other: "FeatureStats", sign: float) -> "FeatureStats":
        return FeatureStats(*(a + sign * b for a, b in zip(
            (self.n, self.gram, self.f_sum, self.fy, self.y_sum, self.yy, self.class_sum,
             self.class_n),
            (other.n, other.gram, other.f_sum, other.fy, other.y_sum, other.yy,
             other.class_sum, other.class_n))))

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return self._combine(other, 1.0)

    def __sub__(self, other: "FeatureStats") -> "FeatureStats":
        return self._combine(other, -1.0)

    def standardised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centred gram of the standardised features, the channel means, 1 / channel std);
        a constant channel gets 1 / std = 0, i.e. it is dropped (it adds nothing to the
        evidence either way: a zero eigenvalue)."""
        mean = self.f_sum / self.n
        gram_c = self.gram - self.n * torch.outer(mean, mean)
        var = gram_c.diagonal().clamp_min(0) / self.n
        alive = var > 1e-10 * float(var.max()) if float(var.max()) > 0 else var > 0
        inv = torch.where(alive, var.clamp_min(1e-300).rsqrt(), torch.zeros_like(var))
        return gram_c * torch.outer(inv, inv), mean, inv


@torch.no_grad()
def feature_statistics(features_fn: FeatureFn, task: LabelledTask, batch_size: int,
                       device: torch.device | str = "cpu"
                       ) -> tuple[FeatureStats, dict[int, FeatureStats]]:
    """(stats over every sampled pixel of every image, {image index: its own stats} for the
    images with a missing landmark, which are subtracted for that landmark's regression)."""
    total: Optional[FeatureStats] = None
    partial: dict[int, FeatureStats] = {}
    grid = (task.grid, task.grid)
    for start in range(0, len(task.ids), batch_size):
        maps = features_fn(task.images[start:start + batch_size].to(device))
        hyper = resize_features([m.float() for m in maps], grid).flatten(2)  # (B, D, g*g)
        complete = []
        for j in range(hyper.shape[0]):
            i = start + j
            f = hyper[j][:, task.pixels[i].to(hyper.device)].T.double().cpu()
            one = (f, task.targets[i], task.classes[i])
            if bool(task.mask[i].all()):
                complete.append(one)
            else:
                partial[i] = FeatureStats.of(*one)
                total = partial[i] if total is None else total + partial[i]
        if complete:
            stats = FeatureStats.of(*(torch.cat(parts) for parts in zip(*complete)))
            total = stats if total is None else total + stats
    if total is None or total.n == 0:
        raise ValueError("no labelled pixel to score (no landmark in any image?)")
    return total, partial


# ----------------------------------------------------------------------------------------------
# LogME
# ----------------------------------------------------------------------------------------------

def log_evidence(sigma: np.ndarray, z: np.ndarray, yy: float, n: float, alpha: float,
                 beta: float) -> float:
    """log p(y | F, alpha, beta) / n of y = F w + e, w ~ N(0, I / alpha), e ~ N(0, I / beta),
    in the eigenbasis of F^T F (eigenvalues sigma, z = V^T F^T y, yy = y^T y; Bishop, PRML
    eq. 3.86): D/2 log a + n/2 log b - |A|/2 - b/2 |y - F m|^2 - a/2 |m|^2 - n/2 log 2 pi,
    A = a I + b F^T F, m = b A^-1 F^T y = V z / (sigma + a / b)."""
    t = alpha / beta
    m2 = float(np.sum(z ** 2 / (sigma + t) ** 2))
    res2 = float(yy - np.sum(z ** 2 * (sigma + 2 * t) / (sigma + t) ** 2))
    value = (len(sigma) / 2 * math.log(alpha) + n / 2 * math.log(beta)
             - 0.5 * float(np.sum(np.log(alpha + beta * sigma)))
             - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return value / n


def logme_fit(sigma: np.ndarray, z: np.ndarray, yy: float, n: float, max_iter: int = 200,
              tol: float = 1e-7) -> tuple[float, float, float, int]:
    """(max log evidence / n, alpha, beta, iterations): LogME's fixed point, started at
    alpha = beta = 1 like the reference code; stops when alpha / beta moves by < tol.

    Features that carry no information on y drive alpha to infinity (the evidence is then
    maximised by w = 0); alpha / beta is capped at 1e12 x (largest eigenvalue + 1), where the
    evidence equals that limit to ~1e-12 instead of overflowing."""
    sigma = np.clip(np.asarray(sigma, np.float64), 0.0, None)
    z = np.asarray(z, np.float64)
    tiny = 1e-12 * max(yy, 1e-300)
    t_max = 1e12 * (float(sigma.max(initial=0.0)) + 1.0)
    alpha, beta = 1.0, 1.0
    for it in range(1, max_iter + 1):
        t = alpha / beta
        gamma = float(np.sum(sigma / (sigma + t)))
        m2 = float(np.sum(z ** 2 / (sigma + t) ** 2))
        res2 = float(yy - np.sum(z ** 2 * (sigma + 2 * t) / (sigma + t) ** 2))
        beta = max(n - gamma, 1e-12) / max(res2, tiny)
        alpha = min(max(gamma, 1e-300) / max(m2, 1e-300), t_max * beta)
        if abs(alpha / beta - t) <= tol * t:
            break
    return log_evidence(sigma, z, yy, n, alpha, beta), alpha, beta, it


def _landmark_logme(stats: FeatureStats, k: int, cache: dict, key: tuple) -> dict:
    if key not in cache:                   # one decomposition per distinct sample set
        gram, mean, inv = stats.standardised()
        sigma, vectors = torch.linalg.eigh(gram)
        cache[key] = (sigma.numpy(), vectors, mean, inv)
    sigma, vectors, mean, inv = cache[key]
    y_mean = float(stats.y_sum[k]) / stats.n
    b = (stats.fy[:, k] - stats.n * mean * y_mean) * inv          # F_std^T (y - y_mean)
    yy = float(stats.yy[k]) - stats.n * y_mean ** 2
    if yy <= 0:
        return {"evidence": float("nan"), "alpha": float("nan"), "beta": float("nan"),
                "iterations": 0, "samples": stats.n}
    z = (vectors.T @ b).numpy()
    evidence, alpha, beta, it = logme_fit(sigma, z, yy, stats.n)
    return {"evidence": evidence, "alpha": alpha, "beta": beta, "iterations": it,
            "samples": stats.n}


def logme_score(total: FeatureStats, partial: dict[int, FeatureStats],
                task: LabelledTask) -> dict:
    """{"score": mean over landmarks of the max log evidence per sample, "per_landmark": [...],
    "samples", "channels"}; a landmark's regression leaves out the images where it is missing."""
    cache: dict = {}
    per_landmark = []
    for k in range(task.num_landmarks):
        stats = total
        missing = [i for i in partial if not bool(task.mask[i, k])]
        for i in missing:
            stats = stats - partial[i]
        if stats.n == 0:
            per_landmark.append({"evidence": float("nan"), "samples": 0})
            continue
        per_landmark.append(_landmark_logme(stats, k, cache, key=tuple(missing)))
    values = [p["evidence"] for p in per_landmark if math.isfinite(p["evidence"])]
    return {"score": float(np.mean(values)) if values else float("nan"),
            "per_landmark": per_landmark, "samples": total.n,
            "channels": int(total.gram.shape[0])}


def hscore(total: FeatureStats, shrinkage: float) -> dict:
    """{"score": tr(R_l^-1 cov(E[f | class])), ...} on standardised features, R_l = (1 - l) R
    + l I with R their correlation matrix (see the module doc). Higher = more transferable."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"hscore shrinkage must be in [0, 1], got {shrinkage}")
    gram, mean, inv = total.standardised()
    corr = gram / total.n
    reg = (1 - shrinkage) * corr + shrinkage * torch.eye(len(corr), dtype=corr.dtype)
    used = total.class_n > 0
    means = ((total.class_sum[used] - total.class_n[used, None] * mean)
             / total.class_n[used, None]) * inv                   # (C, D) class means
    between = (means.T * (total.class_n[used] / total.n)) @ means
    value = float(torch.trace(torch.linalg.solve(reg, between)))
    return {"score": value, "samples": total.n, "channels": int(len(corr)),
            "classes": int(used.sum())}


# ----------------------------------------------------------------------------------------------
# Label maps, SSIM, rank correlation
# ----------------------------------------------------------------------------------------------

def mean_label_map(heatmaps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S, S) mean over images of the sum of the present landmarks' Gaussians, scaled to a
    maximum of 1 (SSIM then compares shapes, not the number of landmarks)."""
    total = (heatmaps.double() * mask.double()[:, :, None, None]).sum(dim=1).mean(dim=0)
    peak = float(total.max())
    if not peak > 0:
        raise ValueError("mean label map is empty (no landmark in any image)")
    return total / peak


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al., IEEE TIP 2004) of two (H, W) images: Gaussian-weighted means,
    variances and covariance (population moments) in every window position fully inside the
    image (no padding), (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2
    + C2)), C1 = (k1 L)^2, C2 = (k2 L)^2, averaged."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two (H, W) images of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if min(a.shape) < window:
        raise ValueError(f"images of {tuple(a.shape)} are smaller than the {window} px window")
    w = _gaussian_window(window, sigma)
    x, y = a.double()[None, None], b.double()[None, None]
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x ** 2
    var_y = F.conv2d(y * y, w) - mu_y ** 2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return float(value.mean())


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ascending; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties handled); NaN for
    fewer than 2 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else float("nan")
