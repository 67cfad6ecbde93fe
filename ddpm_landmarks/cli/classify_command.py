"""`ddpm-landmarks evaluate-classifier RUN [--split test]`: score a classification run
(accuracy, balanced accuracy, one-vs-rest AUC, confusion matrix; metrics.json +
predictions.csv). Training is `ddpm-landmarks classify` (cli/training_commands.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    from ddpm_landmarks.evaluation.classification_metrics import (
        format_classification_summary,
    )
    from ddpm_landmarks.inference.classifier_runs import evaluate_classifier_run
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    summary = evaluate_classifier_run(args.run, args.split, args.weights, args.overrides,
                                      Path(args.out) if args.out else None, args.device)
    title = (f"{Path(args.run).name} ({Path(summary['weights']).name}) on "
             f"{summary['split']}")
    print(format_classification_summary(summary, title))
    print(f"results: {summary['out_dir']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate-classifier",
                              help="score a classification run on a labelled split")
    p.add_argument("run", help="classification run folder (runs/<name>)")
    p.add_argument("--split", default=None, help="split to score (default: data.eval_split)")
    p.add_argument("--weights", default="best",
                   help="best (default; export/ when there was no validation), export, or a "
                        "saved classifier folder")
    p.add_argument("--out", default=None, help="result folder (default RUN/eval_<split>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/x")
    p.set_defaults(func=cmd_evaluate_classifier)
