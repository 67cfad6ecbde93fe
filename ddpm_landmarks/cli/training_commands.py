"""`ddpm-landmarks pretrain | finetune | classify CONFIG [overrides]`: one training job in this
process. For several processes / GPUs / nodes use the same config with
`accelerate launch -m ddpm_landmarks.<pretrain|finetune|classify> --config CONFIG [overrides]`.
"""
from __future__ import annotations

import argparse

from ddpm_landmarks.config.schema import load_config

# torch / diffusers load only when a training command runs (function-level imports).


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ddpm_landmarks.config.pretrain import PretrainConfig
    from ddpm_landmarks.pretrain import pretrain
    pretrain(load_config(args.config, args.overrides, cls=PretrainConfig))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ddpm_landmarks.config.finetune import FinetuneConfig
    from ddpm_landmarks.finetune import finetune
    finetune(load_config(args.config, args.overrides, cls=FinetuneConfig))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from ddpm_landmarks.classify import classify
    from ddpm_landmarks.config.classify import ClassifyConfig
    classify(load_config(args.config, args.overrides, cls=ClassifyConfig))
    return 0


# command -> (function, help, config folder, example override)
COMMANDS = {
    "pretrain": (cmd_pretrain, "pretrain a DDPM U-Net (or an SSL encoder) on unlabelled x-rays",
                 "configs/pretrain", "train.max_steps=300"),
    "finetune": (cmd_finetune, "fine-tune a landmark heatmap regressor with few labels",
                 "configs/finetune", "fewshot.budget=10"),
    "classify": (cmd_classify, "fine-tune an image classifier on any encoder",
                 "configs/classify", "model.freeze=encoder"),
}


def add_parser(subparsers) -> None:
    for name, (func, text, folder, example) in COMMANDS.items():
        p = subparsers.add_parser(name, help=text)
        p.add_argument("config", help=f"YAML config ({folder}/*.yaml)")
        p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
        p.set_defaults(func=func)
