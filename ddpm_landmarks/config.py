"""Typed run configuration: dataclasses <- YAML file <- dotted command-line overrides.

    cfg = load_config("configs/isbi2015.yaml", ["data.image_size=256", "fewshot.budget=25"])
    save_config(cfg, run_dir / "config.yaml")

Every key is checked against the dataclass fields: an unknown key, or a value of the wrong
type, raises ConfigError naming the dotted key and listing the valid ones. Nothing is coerced
silently except the two conversions YAML cannot express (int -> float, list -> tuple).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ddpm_landmarks.utils.atomic import atomic_write_text


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

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
    val_policy: Literal["fixed_count", "within_budget", "none"] = "fixed_count"
    val_count: int = 10                 # fixed_count: from the rest of the pool; within_budget: of N


@dataclass
class AugmentConfig:
    """Geometric steps move the landmarks with the same matrix; flip needs a permutation."""
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05             # fraction of the model grid
    shear_deg: float = 0.0
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


# ----------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with checks
# ----------------------------------------------------------------------------------------------

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (int->float, list->tuple allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:            # Optional[X]: X's own, more precise, error
            return _convert(value, options[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        # YAML 1.1 reads a bare `no` / `off` as False (`mixed_precision=no`): map it back to
        # the literal the user typed when the field only takes strings.
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = {False: "no", True: "yes"}[value]
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is list:
            (item_tp,) = args or (Any,)
            return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if len(args) == 2:               # dict[str, X]: every value checked as an X
            # `name:` with nothing under it is an entry with all defaults.
            empty = {} if dataclasses.is_dataclass(args[1]) else None
            return {str(k): _convert(empty if v is None else v, args[1], f"{key}.{k}")
                    for k, v in value.items()}
        return dict(value)
    # Scalars. bool is a subclass of int in Python: refuse it where a number is meant.
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponent forms without a dot (1e-4, -1e9) as strings.
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that list valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML and W&B."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides, files
# ----------------------------------------------------------------------------------------------

def apply_override(data: dict, cls: type, override: str) -> None:
    """Apply one `a.b.c=value` override to the nested dict `data` (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        where = ".".join(parts[:depth + 1])
        if part not in names:
            raise ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() != "" else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {err}") from None
            return
        node_cls = typing.get_type_hints(node_cls)[part]
        args = typing.get_args(node_cls)
        if typing.get_origin(node_cls) is dict and len(args) == 2 \
                and dataclasses.is_dataclass(args[1]) and depth + 2 < len(parts):
            # A named entry of a dict[str, Section] (e.g. grid `inits.ddpm.overrides=[...]`):
            # the next part names the entry, the rest are the section's fields.
            entries = node.get(part) or {}
            name = parts[depth + 1]
            if not isinstance(entries, dict) or name not in entries:
                raise ConfigError(f"'{where}' has no entry {name!r}; entries: "
                                  f"{', '.join(entries) if isinstance(entries, dict) else '-'}")
            if entries[name] is None:
                entries[name] = {}
            try:
                return apply_override(entries[name], args[1],
                                      ".".join(parts[depth + 2:]) + "=" + raw)
            except ConfigError as err:
                raise ConfigError(f"{where}.{name}: {err}") from None
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"'{where}' is a value, not a section; cannot set '{dotted}'")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{where}' must be a mapping in the config file")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = ExperimentConfig) -> Any:
    """Load `cls` from a YAML file (optional) and apply dotted overrides, all checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    for override in overrides or []:
        apply_override(data, cls, override)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (it is what reproduces a run)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(path), text)
