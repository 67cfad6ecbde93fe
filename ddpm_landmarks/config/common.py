"""The config sections every run shares: which labelled data and how it is put on the model
grid, the unlabelled pools, the few-shot budget, augmentation, heatmap targets, decoding,
evaluation and the run folder. ExperimentConfig (these sections alone) is what the data
commands and the mean-shape baseline read; the training configs add their own sections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class DataConfig:
    """Which labelled dataset, where, and how it is put on the model grid."""
    dataset: str = "synthetic"          # registry name, see ddpm_landmarks.data.registry
    root: str = ""                      # dataset folder; "" = the dataset's default location
    ground_truth: str = "mean"          # ISBI 2015: senior | junior | mean | challenge
    train_split: str = "train"
    eval_split: str = "test1"
    image_size: int = 256               # model grid is image_size x image_size
    resize_mode: Literal["stretch", "letterbox"] = "stretch"  # stretch = the paper
    num_landmarks: Optional[int] = None  # None = the dataset's own count; else checked
    on_bad_sample: Literal["error", "skip"] = "error"  # skip = count and log, never silent
    # How gray levels become the [-1, 1] network input (data/intensity.py, to_model_input):
    # fixed = the file's container range (ours); minmax = per-image min-max of the model-grid
    # image (the released code's albumentations Normalize(normalization="min_max")).
    intensity_norm: Literal["fixed", "minmax"] = "fixed"
    # Digital Hand Atlas: the two landmarks whose distance is 50 mm (0-based indices; Payer's
    # normalization_indizes=[1, 5], which his .mha ElementSpacing follows).
    wrist_landmarks: tuple[int, int] = (1, 5)
    # Chest (GU2Net labels): errors are reported in pixels of this (width, height) grid.
    reference_size: tuple[int, int] = (512, 512)
    # Synthetic data: generated into root (or the cache folder) on first use.
    synthetic_num_images: int = 120
    synthetic_image_size: int = 256
    synthetic_num_landmarks: int = 8
    synthetic_seed: int = 0


@dataclass
class PoolConfig:
    path: str = ""
    weight: float = 1.0                 # relative sampling weight when pools are mixed
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
    budget: Optional[int] = None        # labelled training images; None = the whole split
    draw: int = 0                       # which draw of N (several draws per N)
    seed: int = 0                       # base seed of the draws
    policy: Literal["random", "first_n"] = "random"  # first_n = the original code, for comparison
    # split: the images of the named split `val_split` (e.g. the released code's fixed
    # validation sets, released_val: 20 / 59 / 34 images for ISBI / hand / chest).
    val_policy: Literal["fixed_count", "within_budget", "split", "none"] = "fixed_count"
    val_count: int = 10                 # fixed_count: from the rest of the pool; within_budget: of N
    val_split: str = ""                 # val_policy=split: a split of data.dataset


@dataclass
class AugmentConfig:
    """Geometric steps move the landmarks with the same matrix; flip needs a permutation."""
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05             # fraction of the model grid
    shear_deg: float = 0.0
    # Share of images that get the random affine (the released code's ShiftScaleRotate: p 0.5),
    # and what fills the grid outside the image: constant (0, ours) or replicate (the edge
    # pixels, the released code's cv2.BORDER_REPLICATE).
    affine_prob: float = 1.0
    border: Literal["constant", "replicate"] = "constant"
    flip_prob: float = 0.0              # refused unless the dataset has a left/right permutation
    brightness: float = 0.1             # additive, uniform in [-b, b]
    contrast: float = 0.1               # multiplicative around the mean, 1 +/- c
    gamma: tuple[float, float] = (0.8, 1.25)
    clahe_prob: float = 0.0
    noise_std: float = 0.01
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)


@dataclass
class HeatmapConfig:
    kind: Literal["gaussian", "disc"] = "gaussian"  # disc = thresholded target of the original code
    sigma: float = 3.0                  # in model-grid pixels
    disc_radius: float = 5.0            # in model-grid pixels (disc target)


@dataclass
class DecoderConfig:
    name: Literal["argmax", "parabola", "soft_argmax", "contour"] = "parabola"
    window: int = 5                     # soft_argmax: half-width of the window around the peak
    min_peak: float = 0.05              # below this peak value a channel is reported missing
    contour_threshold: float = 0.5      # contour: fraction of the peak that defines the blob


@dataclass
class EvalConfig:
    # SDR radii in the dataset's unit; None = the dataset's usual ones (head 2/2.5/3/4 mm,
    # hand 2/4/10 mm, ...).
    sdr_thresholds: Optional[list[float]] = None
    sdr_inclusive: bool = True          # error <= threshold counts as detected (the field's habit)
    flip_tta: bool = False              # average with the flipped image (needs a flip permutation)
    batch_size: int = 16                # inference batch
    overlays: int = 3                   # best and worst images drawn with predictions


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
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
