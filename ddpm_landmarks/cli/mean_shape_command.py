"""`ddpm-landmarks mean-shape CONFIG`: fit and evaluate the trivial mean-shape predictor
(evaluation/mean_shape.py)."""
from __future__ import annotations

import argparse

from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.evaluation.evaluate import format_summary
from ddpm_landmarks.evaluation.mean_shape import prepare_run_dir, run_mean_shape


def cmd_mean_shape(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = prepare_run_dir(cfg)
    summary = run_mean_shape(cfg, run_dir)
    print(format_summary(summary, f"mean shape of {summary['train_images']} images on "
                                  f"{summary['dataset'].name}"))
    print(f"results: {summary['out_dir']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mean-shape", help="evaluate the trivial mean-shape predictor")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fewshot.budget=10")
    p.set_defaults(func=cmd_mean_shape)
