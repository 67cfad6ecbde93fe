"""`ddpm-landmarks attention RUN_OR_EXPORT --data CONFIG [--split S] [--images N] [--out DIR]`.

How much of a trained model's input-gradient saliency falls inside the region around the
ground-truth landmarks (studies/attention.py): a fine-tuning run or saved regressor, a DDPM
export, an SSL encoder export, or a pretraining run folder (its best/ or export/). Writes
per_image.csv, summary.json, summary.md and overlays/ into --out (default
<run>/attention_<split>/) and prints the summary table. Overrides after the options change the
data config (e.g. data.root=/my/isbi).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.schema import apply_override, from_dict
from ddpm_landmarks.errors import ConfigError


@dataclass
class _DataOnly:
    """The data section of any config file (dataset, fine-tuning or pretraining config)."""
    data: DataConfig = field(default_factory=DataConfig)


def load_data_config(path: str, overrides: list[str]) -> DataConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--data: config file not found: {file}")
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), dict):
        raise ConfigError(f"--data: {file} has no 'data' section")
    data = {"data": dict(loaded["data"])}
    for override in overrides:
        apply_override(data, _DataOnly, override)
    return from_dict(_DataOnly, data, prefix=str(file)).data


def cmd_attention(args: argparse.Namespace) -> int:
    from ddpm_landmarks.studies.attention import (
        AttentionConfig,
        analyse,
        default_out_dir,
        summary_markdown,
    )
    from ddpm_landmarks.studies.attention_models import load_analysed_model
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    data_cfg = load_data_config(args.data, args.overrides)
    cfg = AttentionConfig(radius=args.radius, roi=args.roi, images=args.images,
                          overlays=args.overlays, batch_size=args.batch_size)
    analysed = load_analysed_model(args.run, args.weights, device=args.device)
    split = args.split or data_cfg.eval_split
    out_dir = default_out_dir(analysed, split, args.out)
    summary = analyse(analysed, data_cfg, split, out_dir, cfg)
    print(summary_markdown(summary))
    print(f"results: {out_dir}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attention", help="share of a model's saliency inside the region around the landmarks")
    p.add_argument("run", help="fine-tuning run, saved regressor, DDPM / SSL export, or a "
                               "pretraining run folder")
    p.add_argument("--data", required=True,
                   help="config whose data section names the labelled dataset (e.g. "
                        "configs/isbi2015.yaml); the model's own grid size is used")
    p.add_argument("--split", default=None, help="labelled split (default: data.eval_split)")
    p.add_argument("--images", type=int, default=20, help="first N images of the split; 0 = all")
    p.add_argument("--radius", type=float, default=10.0,
                   help="ROI radius around each landmark in the dataset's unit (mm where it "
                        "has a spacing, else pixels); default 10")
    p.add_argument("--roi", choices=("discs", "hull"), default="discs",
                   help="union of discs (default) or discs + the landmarks' convex hull")
    p.add_argument("--overlays", type=int, default=4, help="overlay PNGs of the first K images")
    p.add_argument("--weights", default="best",
                   help="subfolder of a run folder: best (default; falls back to export) or export")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="result folder (default <run>/attention_<split>)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("overrides", nargs="*", help="data overrides, e.g. data.root=/data/isbi")
    p.set_defaults(func=cmd_attention)
