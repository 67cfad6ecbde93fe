"""`ddpm-landmarks finetune CONFIG [overrides]`: few-shot fine-tuning in this process.

For several processes use `accelerate launch -m ddpm_landmarks.finetune --config CONFIG`.
"""
from __future__ import annotations

import argparse


def cmd_finetune(args: argparse.Namespace) -> int:
    from ddpm_landmarks.finetune import run_from_args   # torch / diffusers load only when used
    return run_from_args(args.config, args.overrides)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a heatmap regressor with few labels")
    p.add_argument("config", help="YAML config (configs/finetune/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fewshot.budget=10")
    p.set_defaults(func=cmd_finetune)
