"""`ddpm-landmarks report RUNS_DIR [--out DIR] [--wandb | --no-wandb]`.

Tables (Markdown, CSV) and figures (label efficiency, per-landmark errors) of a grid folder;
see experiments/report.py. By default the report goes to W&B when the grid logs to W&B.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddpm_landmarks.errors import ConfigError


def cmd_report(args: argparse.Namespace) -> int:
    from ddpm_landmarks.experiments.report import write_report

    grid_dir = Path(args.runs_dir)
    wandb = args.wandb
    if wandb is None:
        plan_file = grid_dir / "grid.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        wandb = plan.get("grid", {}).get("logger", {}).get("kind") == "wandb"
    try:
        result = write_report(grid_dir, args.out, wandb=wandb)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    print((Path(result["files"]["summary_md"])).read_text())
    for name, path in result["files"].items():
        if name != "figures" and path:
            print(f"{name}: {path}")
    for path in result["files"]["figures"]:
        print(f"figure: {path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables and figures of an experiment grid folder")
    p.add_argument("runs_dir", help="grid folder (runs/grids/<name>)")
    p.add_argument("--out", default=None, help="output folder (default RUNS_DIR/report)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--wandb", dest="wandb", action="store_true", default=None,
                       help="log the report to a W&B summary run")
    group.add_argument("--no-wandb", dest="wandb", action="store_false")
    p.set_defaults(func=cmd_report)
