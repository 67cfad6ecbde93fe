"""`ddpm-landmarks grid EXPERIMENT.yaml [--dry-run] [--only PATTERN] [overrides]`.

Runs every cell of an experiment grid that is not finished yet (see experiments/grid.py), then
writes the report. --dry-run prints the cells, the shared pretrainings and source fine-tunings
and their estimated cost without running anything. Overrides are dotted keys of the experiment
file, e.g. `seeds=[0]`, `launcher.kind=accelerate`,
`inits.ddpm.pretrain_overrides=[train.max_steps=100]`.
"""
from __future__ import annotations

import argparse


def cmd_grid(args: argparse.Namespace) -> int:
    from ddpm_landmarks.experiments.grid import (
        PRETRAIN_STATUS,
        SOURCE_STATUS,
        GridInterrupted,
        is_done,
        read_status,
        run_grid,
        select_cells,
    )
    from ddpm_landmarks.experiments.grid_plan import build_plan
    from ddpm_landmarks.experiments.grid_schema import load_grid
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    grid = load_grid(args.experiment, args.overrides)
    if args.dry_run:
        from ddpm_landmarks.experiments.cost import estimate, format_estimate
        plan = build_plan(grid)
        plan.cells = select_cells(plan, args.only)
        done_cells = {c.name for c in plan.cells if is_done(c)}
        done_pre = {p.name for p in plan.pretrainings
                    if read_status(p.run_dir / PRETRAIN_STATUS).get("status") == "done"}
        done_src = {s.name for s in plan.sources
                    if read_status(s.run_dir / SOURCE_STATUS).get("status") == "done"}
        print(format_estimate(plan, estimate(plan, done_cells, done_pre,
                                             done_sources=done_src)))
        return 0
    try:
        outcome = run_grid(grid, only=args.only, report=not args.no_report)
    except GridInterrupted as err:
        print(f"[grid] {err}", flush=True)
        return 128 + err.signum          # the shell's convention for a signal
    return 1 if outcome["failed"] else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("grid", help="run an experiment grid (dataset x init x budget x seed)")
    p.add_argument("experiment", help="experiment file (experiments/*.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells and their estimated cost; run nothing")
    p.add_argument("--only", default=None,
                   help="run only cells whose name contains every comma-separated part, "
                        "e.g. 'isbi2015-ddpm,N50'")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the experiment file")
    p.set_defaults(func=cmd_grid)
