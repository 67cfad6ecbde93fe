"""A grid's report to W&B: one summary run `<grid>-report` in the grid's group (the group the
grid's training and evaluation runs are in), holding the cells and summary tables and the
figures. Offline (a local run under report/wandb/) without an API key, like training."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ddpm_landmarks.utils.wandb import csv_table, resolve_wandb_mode


def log_report(grid: dict, name: str, report_dir: Path, figures: list[Path]) -> Optional[str]:
    """grid: the grid config as plain data (grid.json's "grid"); returns the W&B run folder."""
    logger = grid.get("logger", {})
    mode = resolve_wandb_mode(logger.get("wandb_mode", "auto"))
    if mode == "disabled":
        return None
    import wandb
    run = wandb.init(project=logger.get("project", "ddpm-landmarks"),
                     entity=logger.get("entity") or None, mode=mode, dir=str(report_dir),
                     name=f"{name}-report", group=name, job_type="report",
                     tags=["report"], config={"grid": grid}, reinit="create_new")
    try:
        run.log({"report/summary": csv_table(wandb, report_dir / "summary.csv"),
                 "report/cells": csv_table(wandb, report_dir / "cells.csv"),
                 **{f"report/{Path(f).stem}": wandb.Image(str(f)) for f in figures}})
        return run.dir
    finally:
        run.finish()
