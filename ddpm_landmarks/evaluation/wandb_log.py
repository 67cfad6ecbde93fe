"""Evaluation results to W&B: a run in the training run's group with the summary numbers (with
the uncertainty ones: AUROC, coverage, mean radius), the per-landmark table, the per-image
predictions table, the overlay images and the sparsification plot; for a two-stage run also
stage 1's numbers (eval/stage1/...) and the side-by-side per-landmark table.

Offline (a local run under run_dir/wandb/) when there is no API key, like training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ddpm_landmarks.utils.wandb import csv_table, resolve_wandb_mode


def uncertainty_values(report: Optional[dict]) -> dict:
    """Flat numbers of an uncertainty report (evaluation/uncertainty_report.py): AUROC and MRE
    drop per score; coverage and mean radius per alpha of the score the regions use."""
    if not report:
        return {}
    values = {}
    for name, r in report["ranking"].items():
        values[f"auroc_{name}"] = r["auroc"]
        values[f"mre_drop_{name}"] = r["mre_drop_percent"]
    for alpha, q in report["regions"].get(report["primary"], {}).items():
        values[f"coverage@{alpha:g}"] = q["overall"]
        values[f"mean_radius@{alpha:g}"] = q["mean_radius"]
    return values


def log_evaluation(logger_cfg, run_dir: Path, name: str, summary: dict,
                   out_dir: Path) -> Optional[str]:
    """Log one evaluation; returns the W&B run folder (None when W&B is off)."""
    if logger_cfg.kind != "wandb":
        return None
    mode = resolve_wandb_mode(logger_cfg.wandb_mode)
    if mode == "disabled":
        return None
    import wandb
    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity or None, mode=mode,
                     dir=str(run_dir), name=name, group=logger_cfg.group or run_dir.name,
                     tags=list(logger_cfg.tags) or None, job_type="evaluate",
                     reinit="create_new")
    try:
        values = {"mre": summary["mre"], "sd": summary["sd"], "median": summary["median"],
                  "n": summary["n"], "missed": summary["missed"]}
        values.update({f"sdr@{t:g}": v for t, v in summary["sdr"].items()})
        values.update(uncertainty_values(summary.get("uncertainty")))
        run.summary.update({f"eval/{k}": v for k, v in values.items()})
        tables = {"eval/per_landmark": csv_table(wandb, out_dir / "per_landmark.csv"),
                  "eval/predictions": csv_table(wandb, out_dir / "predictions.csv"),
                  "eval/overlays": [wandb.Image(str(p), caption=Path(p).stem)
                                    for p in summary.get("overlays", [])]}
        if (out_dir / "sparsification.png").is_file():
            tables["eval/sparsification"] = wandb.Image(str(out_dir / "sparsification.png"))
        stage1 = summary.get("stage1")
        if stage1 is not None:            # a two-stage run: stage 1 next to the final points
            first = {"mre": stage1["mre"], "sd": stage1["sd"], "median": stage1["median"],
                     "missed": stage1["missed"]}
            first.update({f"sdr@{t:g}": v for t, v in stage1["sdr"].items()})
            run.summary.update({f"eval/stage1/{k}": v for k, v in first.items()})
            tables["eval/refine_per_landmark"] = csv_table(wandb,
                                                           out_dir / "refine_per_landmark.csv")
        run.log(tables)
        return run.dir
    finally:
        run.finish()
