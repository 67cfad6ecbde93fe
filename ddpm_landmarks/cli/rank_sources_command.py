"""`ddpm-landmarks rank-sources --target CONFIG --candidates CKPT [CKPT ...] [--out DIR]
[--validate GRID_DIR ...] [overrides]`.

Ranks pretrained checkpoints for the target fine-tuning config's labelled images without
fine-tuning (studies/source_ranking.py). Overrides `rank.*` set the ranking
(source_ranking.RankConfig: rank.score=hscore, rank.min_label_ssim=0.5, ...); every other
override is the target config's (data.image_size=64 fewshot.budget=25 ...). Overrides may
follow the candidates: an entry that looks like `section.key=value` is an override.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.errors import ConfigError

_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def cmd_rank_sources(args: argparse.Namespace) -> int:
    from ddpm_landmarks.config.finetune import FinetuneConfig
    from ddpm_landmarks.studies.ranking_validation import (
        validate_ranking,
        validation_markdown,
        write_validation,
    )
    from ddpm_landmarks.studies.source_ranking import (
        rank_sources,
        ranking_markdown,
        split_overrides,
        write_ranking,
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # argparse's nargs="+" swallows overrides written after the candidates.
    candidates = [c for c in args.candidates if not _OVERRIDE.match(c)]
    grids = [g for g in args.validate or [] if not _OVERRIDE.match(g)]
    overrides = list(args.overrides) + [a for a in args.candidates + (args.validate or [])
                                        if _OVERRIDE.match(a)]
    rank_cfg, target_overrides = split_overrides(overrides)
    cfg = load_config(args.target, target_overrides, cls=FinetuneConfig)
    for grid in grids:
        if not (Path(grid) / "cells").is_dir():
            raise ConfigError(f"--validate {grid}: not a grid folder (no cells/ inside); run "
                              f"`ddpm-landmarks grid EXPERIMENT.yaml` first")
    result = rank_sources(cfg, rank_cfg, candidates)
    result.settings.update({"target": str(args.target), "overrides": overrides})
    print(ranking_markdown(result))
    files = write_ranking(result, args.out)
    if grids:
        validation = validate_ranking(result, cfg, grids)
        print(validation_markdown(validation, result.score_name))
        files.update(write_validation(validation, result.score_name, args.out))
    for name, path in files.items():
        print(f"{name}: {path}")
    print(f"({result.seconds:.1f} s)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rank-sources", help="rank pretrained checkpoints for a target task before fine-tuning "
                             "(LogME on frozen features + anatomy / label-map filters)")
    p.add_argument("--target", required=True, help="fine-tuning config of the target "
                   "(configs/finetune/*.yaml): its data and few-shot draw")
    p.add_argument("--candidates", nargs="+", required=True, metavar="CKPT",
                   help="DDPM export, SSL encoder export or fine-tuned regressor folders, or "
                        "random:ddpm_unet[:PRESET] / random:smp_encoder[:ENCODER]")
    p.add_argument("--out", default="runs/rank_sources",
                   help="output folder for ranking.md / .csv, scores.json, config.yaml "
                        "(default runs/rank_sources)")
    p.add_argument("--validate", nargs="+", metavar="GRID_DIR", default=None,
                   help="grid folder(s) whose fine-tuned cells give the MRE to correlate with")
    p.add_argument("overrides", nargs="*", help="rank.* or target config overrides")
    p.set_defaults(func=cmd_rank_sources)
