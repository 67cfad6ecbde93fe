"""`ddpm-landmarks calibrate RUN [--count N] [--seed S] [--alphas 0.1 0.05] [--score spread]`.

Conformal calibration of a fine-tuned run: a seeded draw of labelled training-pool images the
run did not train or validate on, predicted as `evaluate` does; per landmark and alpha the
radius factor q is written to RUN/calibration.json (ids in RUN/calibration_ids.txt), which
`evaluate` and `predict` then use for per-point radii and flags.
"""
from __future__ import annotations

import argparse


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ddpm_landmarks.inference.calibrate import calibrate_run, format_calibration
    from ddpm_landmarks.inference.runs import load_trained_run
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    run = load_trained_run(args.run, args.weights, args.overrides, device=args.device)
    result = calibrate_run(run, count=args.count, seed=args.seed, alphas=args.alphas,
                           score=args.score, tta=True if args.tta else None,
                           flip_tta=True if args.flip_tta else None)
    print(format_calibration(result.calibration))
    print(f"calibration: {result.path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="conformal prediction regions for a fine-tuned "
                                                "run (per-landmark radii with guaranteed coverage)")
    p.add_argument("run", help="fine-tuning run folder (runs/<name>)")
    p.add_argument("--count", type=int, default=None,
                   help="calibration images (default uncertainty.calibration_count: all the "
                        "training pool has left after the few-shot train/val images)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the calibration draw (default uncertainty.calibration_seed)")
    p.add_argument("--alphas", type=float, nargs="+", default=None,
                   help="miscoverage levels (default uncertainty.alphas: 0.1 0.05)")
    p.add_argument("--score", default=None, choices=["none", "peak", "spread", "tta"],
                   help="score that scales the regions (default uncertainty.score: spread)")
    p.add_argument("--tta", action="store_true",
                   help="also calibrate the tta score (extra forward passes)")
    p.add_argument("--weights", default="best",
                   help="best (default; export/ when there was no validation), export, or a "
                        "saved regressor folder")
    p.add_argument("--flip-tta", action="store_true",
                   help="predict with flip TTA (evaluate / predict must then use it too)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. uncertainty.spread=gaussian_fit")
    p.set_defaults(func=cmd_calibrate)
