"""The config sections every run shares: which labelled data and how it is put on the model
grid, the unlabelled pools, the few-shot budget, augmentation, heatmap targets, decoding,
evaluation and the run folder. ExperimentConfig (these sections alone) is what the data
commands and the mean-shape baseline read; the training configs add their own sections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ddpm_landmarks.config.ranges import ranged


@dataclass
class DataConfig:
    """Which labelled dataset, where, and how it is put on the model grid."""
    dataset: str = "synthetic"          # registry name, see ddpm_landmarks.data.registry
    root: str = ""                      # dataset folder; "" = the dataset's default location
    ground_truth: str = "mean"          # ISBI 2015: senior | junior | mean | challenge
    train_split: str = "train"
    eval_split: str = "test1"
    image_size: int = ranged(256, ">= 1")  # model grid is image_size x image_size
    resize_mode: Literal["stretch", "letterbox"] = "stretch"  # stretch = the paper
    num_landmarks: Optional[int] = ranged(None, ">= 1")  # None = the dataset's own count
    on_bad_sample: Literal["error", "skip"] = "error"  # skip = count and log, never silent
    # How gray levels become the [-1, 1] network input (data/intensity.py, to_model_input):
    # fixed = the file's container range (ours); minmax = per-image min-max of the model-grid
    # image (the released code's albumentations Normalize(normalization="min_max")).
    intensity_norm: Literal["fixed", "minmax"] = "fixed"
    # Digital Hand Atlas: the two landmarks whose distance is 50 mm (0-based indices; Payer's
    # normalization_indizes=[1, 5], which his .mha ElementSpacing follows).
    wrist_landmarks: tuple[int, int] = ranged((1, 5), ">= 0")
    # Chest (GU2Net labels): errors are reported in pixels of this (width, height) grid.
    reference_size: tuple[int, int] = ranged((512, 512), ">= 1")
    # Synthetic data: generated into root (or the cache folder) on first use.
    synthetic_num_images: int = ranged(120, ">= 1")
    synthetic_image_size: int = ranged(256, ">= 16")
    synthetic_num_landmarks: int = ranged(8, ">= 2")    # even: left/right pairs
    synthetic_seed: int = ranged(0, ">= 0")


@dataclass
class PoolConfig:
    path: str = ""
    weight: float = ranged(1.0, "> 0")  # relative sampling weight when pools are mixed
    name: str = ""                      # for logs; defaults to the folder name


@dataclass
class UnlabeledConfig:
    """Image pools for self-supervised pretraining and what must never enter them."""
    pools: list[PoolConfig] = field(default_factory=list)
    # Splits of data.dataset used as one more pool (e.g. [train] for the synthetic demo).
    labelled_splits: list[str] = field(default_factory=list)
    # Excluded images: "dataset:split" (e.g. "isbi2015:test1"), a path to a text file of ids,
    # or a single image id / file stem.
    exclude: list[str] = field(default_factory=list)


@dataclass
class FewShotConfig:
    budget: Optional[int] = ranged(None, ">= 1")  # labelled training images; None = the whole split
    draw: int = ranged(0, ">= 0")       # which draw of N (several draws per N)
    seed: int = ranged(0, ">= 0")       # base seed of the draws
    policy: Literal["random", "first_n"] = "random"  # first_n = the original code, for comparison
    # fixed_count: from the rest of the pool; within_budget: of N; split: the images of the
    # named split `val_split` (e.g. the released code's fixed validation sets, released_val:
    # 20 / 59 / 34 images for ISBI / hand / chest).
    val_policy: Literal["fixed_count", "within_budget", "split", "none"] = "fixed_count"
    val_count: int = ranged(10, ">= 0")
    val_split: str = ""                 # val_policy=split: a split of data.dataset


@dataclass
class AugmentConfig:
    """Geometric steps move the landmarks with the same matrix; flip needs a permutation."""
    rotation_deg: float = ranged(10.0, "[0, 180]")       # uniform in [-r, r]
    scale: tuple[float, float] = ranged((0.9, 1.1), "> 0", ordered=True)
    translate: float = ranged(0.05, "[0, 1]")            # fraction of the model grid
    shear_deg: float = ranged(0.0, "[0, 60]")
    # Share of images that get the random affine (the released code's ShiftScaleRotate: p 0.5),
    # and what fills the grid outside the image: constant (0, ours) or replicate (the edge
    # pixels, the released code's cv2.BORDER_REPLICATE).
    affine_prob: float = ranged(1.0, "[0, 1]")
    border: Literal["constant", "replicate"] = "constant"
    # refused unless the dataset has a left/right permutation
    flip_prob: float = ranged(0.0, "[0, 1]")
    brightness: float = ranged(0.1, "[0, 1]")            # additive, uniform in [-b, b]
    contrast: float = ranged(0.1, "[0, 1]")              # multiplicative around the mean, 1 +/- c
    gamma: tuple[float, float] = ranged((0.8, 1.25), "> 0", ordered=True)
    clahe_prob: float = ranged(0.0, "[0, 1]")
    noise_std: float = ranged(0.01, ">= 0")
    blur_prob: float = ranged(0.0, "[0, 1]")
    blur_sigma: tuple[float, float] = ranged((0.1, 1.0), ">= 0", ordered=True)  # pixels


@dataclass
class HeatmapConfig:
    kind: Literal["gaussian", "disc"] = "gaussian"  # disc = thresholded target of the original code
    sigma: float = ranged(3.0, "> 0")   # in model-grid pixels
    disc_radius: float = ranged(5.0, "> 0")  # in model-grid pixels (disc target)


@dataclass
class DecoderConfig:
    name: Literal["argmax", "parabola", "soft_argmax", "contour"] = "parabola"
    window: int = ranged(5, ">= 1")     # soft_argmax: half-width of the window around the peak
    # below this peak value a channel is reported missing; -inf = never (validation's choice)
    min_peak: float = ranged(0.05, "any")
    contour_threshold: float = ranged(0.5, "(0, 1)")  # contour: fraction of the peak (the blob)


@dataclass
class EvalConfig:
    # SDR radii in the dataset's unit; None = the dataset's usual ones (head 2/2.5/3/4 mm,
    # hand 2/4/10 mm, ...).
    sdr_thresholds: Optional[list[float]] = ranged(None, "> 0")
    sdr_inclusive: bool = True          # error <= threshold counts as detected (the field's habit)
    flip_tta: bool = False              # average with the flipped image (needs a flip permutation)
    batch_size: int = ranged(16, ">= 1")  # inference batch
    overlays: int = ranged(3, ">= 0")   # best and worst images drawn with predictions


@dataclass
class UncertaintyConfig:
    """Per-landmark uncertainty scores and conformal prediction regions (`calibrate`,
    `evaluate`, `predict`; inference/uncertainty.py, evaluation/conformal.py). Lengths are in
    the dataset's error unit (mm where the spacing is known, else pixels)."""
    # The score that scales each landmark's region: none (one radius per landmark), peak
    # (1 / decoded peak), spread (heatmap spread), tta (spread of test-time-augmented points).
    score: Literal["none", "peak", "spread", "tta"] = "spread"
    spread: Literal["moments", "gaussian_fit"] = "moments"   # heatmaps/spread.py
    window: int = ranged(0, ">= 0")     # spread window half-width, model-grid px; 0 = 3 sigma
    score_floor: float = ranged(1e-3, "> 0")  # scores are raised to this (no division by ~0)
    tta: bool = False                   # also compute the tta score (extra forward passes)
    tta_jitters: int = ranged(4, ">= 0")  # small affine jitters, each mapped back exactly
    tta_rotation_deg: float = ranged(3.0, "[0, 180]")
    tta_scale: tuple[float, float] = ranged((0.97, 1.03), "> 0", ordered=True)
    tta_translate: float = ranged(0.02, "[0, 1]")  # fraction of the model grid
    tta_flip: bool = True               # + the mirrored image (datasets with a permutation)
    tta_seed: int = ranged(0, ">= 0")
    alphas: list[float] = ranged([0.1, 0.05], "(0, 1)")   # miscoverage levels
    # A point is flagged when its radius exceeds this; None = the dataset's smallest SDR
    # threshold (2 mm on ISBI). The same default sets the "large error" of the AUROC.
    flag_radius: Optional[float] = ranged(None, "> 0")
    error_threshold: Optional[float] = ranged(None, "> 0")
    # evaluate: the MRE of the other points when this most uncertain share is flagged
    flagged_fraction: float = ranged(0.1, "[0, 1)")
    # Calibration images: a seeded draw from the training pool without the few-shot train and
    # validation images (None = all of them); never the evaluation split.
    calibration_count: Optional[int] = ranged(None, ">= 1")
    calibration_seed: int = ranged(0, ">= 0")
    calibrate_after_training: bool = False   # finetune ends with `ddpm-landmarks calibrate`


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = ranged(0, ">= 0")
    # A fresh run (train.resume='') into a folder that holds another run is an error; true
    # moves the old contents aside (<run>.replaced-<time>) first (training/run_folder.py).
    overwrite: bool = False


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
