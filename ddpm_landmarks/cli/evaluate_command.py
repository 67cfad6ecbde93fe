"""`ddpm-landmarks evaluate RUN [--split test1] [--weights best|export|DIR] [--flip-tta]
[--tta-score] [--convention ours|released]`.

Scores a fine-tuning run on a labelled split: decode with the run's decoder, map to original
pixels, write metrics.json / per_landmark.csv / predictions.csv and best/worst overlays into
RUN/eval_<split>/ (or --out), log them to W&B when the run's logger is wandb, print the table.
Also the uncertainty report (uncertainty.json, sparsification.png; coverage and radii with the
run's calibration.json, see `ddpm-landmarks calibrate`).
--convention released scores as the released code of Di Via et al. does
(evaluation/released_convention.py), into RUN/eval_<split>_released/, labelled so.
A refinement run (two stages) also writes stage 1's into RUN/eval_<split>/stage1/ and
refine_per_landmark.csv, and prints both tables.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddpm_landmarks.evaluation.evaluate import format_summary
    from ddpm_landmarks.evaluation.uncertainty_report import format_uncertainty
    from ddpm_landmarks.evaluation.wandb_log import log_evaluation
    from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    run = load_trained_run(args.run, args.weights, args.overrides, device=args.device)
    summary = evaluate_run(run, args.split, Path(args.out) if args.out else None,
                           flip_tta=True if args.flip_tta else None, tta_score=args.tta_score,
                           convention=args.convention)
    out_dir = summary["out_dir"]
    title = f"{run.run_dir.name} ({run.weights_dir.name}) on {summary['dataset'].name}" + (
        " + flip TTA" if "_tta" in out_dir.name else "") + (
        ", RELEASED CODE'S CONVENTION" if args.convention == "released" else "")
    if "stage1" in summary:            # a refinement run: both stages, side by side
        print(format_summary(summary["stage1"], f"{title}: stage 1"))
        print(format_summary(summary, f"{title}: final (refined)"))
    else:
        print(format_summary(summary, title))
    if "uncertainty" in summary:       # our convention only
        print(format_uncertainty(summary["uncertainty"]))
    print(f"results: {out_dir}")
    log_evaluation(run.cfg.logger, run.run_dir, f"{run.run_dir.name}-eval-{summary['split']}",
                   summary, out_dir)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a fine-tuned run on a labelled split")
    p.add_argument("run", help="fine-tuning run folder (runs/<name>)")
    p.add_argument("--split", default=None, help="split to score (default: data.eval_split)")
    p.add_argument("--weights", default="best",
                   help="best (default; export/ when there was no validation), export, or a "
                        "saved regressor folder")
    p.add_argument("--flip-tta", action="store_true",
                   help="average with the mirrored image (needs a left/right permutation)")
    p.add_argument("--tta-score", action="store_true",
                   help="also compute the test-time-augmentation uncertainty score")
    p.add_argument("--convention", choices=("ours", "released"), default="ours",
                   help="ours (default): original pixels, the dataset's spacing; released: the "
                        "released code's scoring (256 grid, rounded points, its spacing rules "
                        "and SDR radii), into RUN/eval_<split>_released")
    p.add_argument("--out", default=None, help="result folder (default RUN/eval_<split>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. decoder.name=argmax")
    p.set_defaults(func=cmd_evaluate)
