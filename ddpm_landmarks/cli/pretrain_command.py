"""`ddpm-landmarks pretrain CONFIG [overrides]`: DDPM pretraining in this process.

For several processes use `accelerate launch -m ddpm_landmarks.pretrain --config CONFIG`.
"""
from __future__ import annotations

import argparse


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ddpm_landmarks.pretrain import run_from_args   # torch / diffusers load only when used
    return run_from_args(args.config, args.overrides)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain a DDPM U-Net on unlabelled x-rays")
    p.add_argument("config", help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=300")
    p.set_defaults(func=cmd_pretrain)
