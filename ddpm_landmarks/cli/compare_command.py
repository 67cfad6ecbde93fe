"""`ddpm-landmarks compare RUNS_DIR --a ddpm --b scratch [--dataset D] [--out DIR]`.

Paired comparisons of two initialisations of a grid at every label budget and stage (per-image
paired tests within a seed, t intervals over seeds), and of the refinement stage against stage
1; see studies/paired_comparison.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ddpm_landmarks.errors import ConfigError


def cmd_compare(args: argparse.Namespace) -> int:
    from ddpm_landmarks.studies.paired_comparison import write_comparison

    try:
        write_comparison(Path(args.runs_dir), args.a, args.b, args.dataset, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    out = Path(args.out) if args.out else Path(args.runs_dir) / "report"
    print((out / f"compare_{args.a}_vs_{args.b}.md").read_text())
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="paired comparison of two inits of a grid "
                                              "(and of refinement vs stage 1)")
    p.add_argument("runs_dir", help="grid folder (runs/grids/<name>)")
    p.add_argument("--a", required=True, help="init whose errors are first (a - b)")
    p.add_argument("--b", required=True, help="init compared with")
    p.add_argument("--dataset", default=None, help="only this dataset of the grid")
    p.add_argument("--out", default=None, help="output folder (default RUNS_DIR/report)")
    p.set_defaults(func=cmd_compare)
