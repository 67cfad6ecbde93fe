"""`ddpm-landmarks classify CONFIG [overrides]` (image classification fine-tuning in this
process) and `ddpm-landmarks evaluate-classifier RUN [--split test]` (accuracy, balanced
accuracy, one-vs-rest AUC, confusion matrix; metrics.json + predictions.csv).

For several processes use `accelerate launch -m ddpm_landmarks.classify --config CONFIG`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_classify(args: argparse.Namespace) -> int:
    from ddpm_landmarks.classify import run_from_args   # torch / diffusers load only when used
    return run_from_args(args.config, args.overrides)


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    from ddpm_landmarks.evaluation.classification_metrics import format_classification_summary
    from ddpm_landmarks.evaluation.classifier_run import evaluate_classifier_run
    from ddpm_landmarks.utils.runs import setup_logging

    setup_logging()
    summary = evaluate_classifier_run(args.run, args.split, args.weights, args.overrides,
                                      Path(args.out) if args.out else None, args.device)
    title = (f"{Path(args.run).name} ({Path(summary['weights']).name}) on "
             f"{summary['split']}")
    print(format_classification_summary(summary, title))
    print(f"results: {summary['out_dir']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("classify", help="fine-tune an image classifier on any encoder")
    p.add_argument("config", help="YAML config (configs/classify/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.freeze=encoder")
    p.set_defaults(func=cmd_classify)

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
