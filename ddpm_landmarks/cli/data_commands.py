"""`ddpm-landmarks data inspect|preview|generate|check`: look at a dataset before training on it.

`data check CONFIG` runs the checks every training run makes at its start (data/checks.py) on
any config: a dataset, pretraining, fine-tuning or classification config, recognised by its
sections (`--run` says which when the file is ambiguous)."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import LandmarkDataset
from ddpm_landmarks.errors import DataError
from ddpm_landmarks.evaluation import visualize


def describe_split(dataset: LandmarkDataset) -> tuple[list[str], list[str]]:
    """Lines describing one split (reads every image: also a readability check) + errors."""
    stored, original, spacings, errors = [], [], [], []
    for i, record in enumerate(dataset.records):
        try:
            sample = dataset[i]
        except DataError as err:
            errors.append(str(err))
            continue
        stored.append(f"{sample.image.shape[1]}x{sample.image.shape[0]}")
        original.append(f"{sample.original_size[0]}x{sample.original_size[1]}")
        spacings.append("unknown" if sample.spacing_mm is None else
                        f"{sample.spacing_mm[0]:.5g}x{sample.spacing_mm[1]:.5g}")
    points = np.stack([r.landmarks for r in dataset.records]) if dataset.records else np.zeros((0, 0, 2))
    missing = np.isnan(points).any(axis=2).sum(axis=0) if len(points) else np.zeros(0, int)
    lines = [
        f"  images: {len(dataset)}",
        f"  stored size (WxH): {_summarise(stored)}",
        f"  original size (WxH): {_summarise(original)}",
        f"  spacing mm/px (x, y): {_summarise(spacings)}",
        f"  missing landmarks: {int(missing.sum())} of {points.shape[0] * points.shape[1]}"
        + ("" if not missing.sum() else " (per landmark: " + ", ".join(
            f"{dataset.landmark_names[k]}={int(m)}" for k, m in enumerate(missing) if m) + ")"),
    ]
    return lines, errors


def _summarise(values: list[str]) -> str:
    counts = Counter(values)
    if len(counts) <= 3:
        return ", ".join(f"{v} ({n})" for v, n in counts.most_common())
    return f"{len(counts)} distinct, most common {counts.most_common(1)[0][0]}"


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    dataset = build_dataset(cfg.data)
    print(f"dataset {dataset.name}: {len(dataset)} images, {dataset.num_landmarks} landmarks, "
          f"errors in {dataset.unit}, flip permutation: "
          f"{'yes' if dataset.flip_permutation else 'none (flip refused)'}")
    skipped = getattr(dataset, "skipped", [])
    if skipped:
        print(f"skipped while reading: {len(skipped)} (first: {skipped[0]})")
    all_errors = []
    for split in dataset.splits:
        print(f"split '{split or '(none)'}':")
        lines, errors = describe_split(dataset.split(split) if split else dataset)
        print("\n".join(lines))
        all_errors += errors
    for err in all_errors:
        print(f"ERROR {err}")
    return 1 if all_errors else 0


def cmd_preview(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    dataset = build_dataset(cfg.data)
    if args.split:
        dataset = dataset.split(args.split)
    rng = np.random.default_rng(args.seed)
    count = min(args.num, len(dataset))
    indices = sorted(rng.choice(len(dataset), size=count, replace=False))
    tiles = []
    for i in indices:
        sample = dataset[i]
        tiles.append(visualize.overlay(sample.image, gt=sample.landmarks_on_stored_grid(),
                                       title=sample.id))
    out = visualize.write_png(args.out, visualize.grid(tiles, columns=args.columns))
    print(f"wrote {out} ({count} images of {dataset.name}, landmarks numbered from 0)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.data.dataset != "synthetic":
        raise DataError(f"data generate makes the synthetic dataset; config says {cfg.data.dataset!r}")
    dataset = build_dataset(cfg.data)
    print(f"synthetic dataset ready: {len(dataset)} images at {Path(dataset.records[0].image_path).parent.parent}")
    return 0


# Sections only one kind of run config has, and the config class of each kind.
RUN_SECTIONS = {"classify": ("labels",),
                "pretrain": ("unlabeled", "diffusion", "ssl", "probe", "curriculum", "method"),
                "finetune": ("loss", "model", "optim", "train")}


def config_class(path: str, run: str) -> type:
    """The config class for `data check`: `run`, or (auto) from the file's sections."""
    from ddpm_landmarks.config.classify import ClassifyConfig
    from ddpm_landmarks.config.common import ExperimentConfig
    from ddpm_landmarks.config.finetune import FinetuneConfig
    from ddpm_landmarks.config.pretrain import PretrainConfig
    classes = {"classify": ClassifyConfig, "pretrain": PretrainConfig,
               "finetune": FinetuneConfig, "dataset": ExperimentConfig}
    if run != "auto":
        return classes[run]
    try:
        sections = set(yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError):
        return ExperimentConfig             # load_config names the problem
    if "fewshot" in sections and "unlabeled" in sections:
        return ExperimentConfig             # a dataset config with pools
    for kind, keys in RUN_SECTIONS.items():
        if sections & set(keys):
            return classes[kind]
    return ExperimentConfig


def cmd_check(args: argparse.Namespace) -> int:
    from ddpm_landmarks.data.checks import check_run_inputs
    cfg = load_config(args.config, args.overrides, cls=config_class(args.config, args.run))
    report = check_run_inputs(cfg, threads=args.threads)
    print("\n".join(report.lines()))
    return 0


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect, preview or generate a dataset")
    sub = data.add_subparsers(dest="data_command", required=True)

    def common(p):
        p.add_argument("config", help="YAML config (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.image_size=256")

    p = sub.add_parser("inspect", help="counts, sizes, spacing and missing landmarks per split")
    common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("preview", help="a PNG grid of images with their numbered landmarks")
    common(p)
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--split", default="", help="only this split")
    p.add_argument("--num", type=int, default=8, help="number of images")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="which images are shown")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("check", help="the checks every run makes at its start: every image "
                       "decodes, paths, landmarks, spacing")
    common(p)
    p.add_argument("--run", choices=["auto", "dataset", "pretrain", "finetune", "classify"],
                   default="auto", help="which run's inputs (auto: from the config's sections)")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: cores)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="write the synthetic dataset (done on first use anyway)")
    common(p)
    p.set_defaults(func=cmd_generate)
