"""The `ddpm-landmarks` command. Each sub-command lives in its own module with `add_parser`."""
from __future__ import annotations

import argparse
import sys

from ddpm_landmarks.cli import (
    attention_command,
    calibrate_command,
    classify_command,
    compare_command,
    data_commands,
    evaluate_command,
    grid_command,
    mean_shape_command,
    predict_command,
    rank_sources_command,
    report_command,
    training_commands,
)
from ddpm_landmarks.errors import ConfigError, DataError, NonFiniteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-landmarks",
        description="Few-shot anatomical landmark detection in x-rays with diffusion pretraining.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    data_commands.add_parser(subparsers)
    mean_shape_command.add_parser(subparsers)
    training_commands.add_parser(subparsers)
    evaluate_command.add_parser(subparsers)
    calibrate_command.add_parser(subparsers)
    predict_command.add_parser(subparsers)
    grid_command.add_parser(subparsers)
    report_command.add_parser(subparsers)
    compare_command.add_parser(subparsers)
    classify_command.add_parser(subparsers)       # evaluate-classifier
    rank_sources_command.add_parser(subparsers)
    attention_command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`preview cfg.yaml --out x.png data.image_size=64`):
    # argparse leaves the ones after an option unparsed, so collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
