"""`ddpm-landmarks predict RUN --images FOLDER --out preds.csv [--overlay DIR] [--flip-tta]`.

Predicts the landmarks of every image in a folder (recursive; png, jpg, bmp, tif, dcm) with a
fine-tuned run: points in each file's own pixels, at full precision, with the decoded peak as
confidence, in one CSV (image,landmark_index,name,x,y,confidence,width,height). Unreadable files
are reported by name and skipped; the exit status is 1 when any failed, 0 when all succeeded.
With the run's calibration (`ddpm-landmarks calibrate`) each point also gets its conformal
radius per alpha and a flag when the radius exceeds uncertainty.flag_radius.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_predict(args: argparse.Namespace) -> int:
    from ddpm_landmarks.errors import ConfigError
    from ddpm_landmarks.inference.predict import predict_folder, write_predictions_csv
    from ddpm_landmarks.inference.runs import load_trained_run
    from ddpm_landmarks.utils.logging_setup import setup_logging

    setup_logging()
    run = load_trained_run(args.run, args.weights, args.overrides, device=args.device)
    spacing = None
    if args.spacing is not None:
        if len(args.spacing) not in (1, 2) or min(args.spacing) <= 0:
            raise ConfigError(f"--spacing: one or two positive numbers (mm per pixel, x y), got "
                              f"{args.spacing}")
        spacing = (args.spacing[0], args.spacing[-1])
    result = predict_folder(run, Path(args.images), flip_tta=True if args.flip_tta else None,
                            batch_size=args.batch_size, overlay_dir=args.overlay,
                            spacing=spacing)
    out = write_predictions_csv(result, args.out)
    print(f"predictions: {out}")
    if args.overlay:
        print(f"overlays: {args.overlay} ({len(result.overlays)} images)")
    for name, message in result.failed:
        print(f"failed: {name}: {message}", file=sys.stderr)
    summary = f"{result.total} images, {len(result.failed)} failed"
    print(summary, file=sys.stderr if result.failed else sys.stdout)
    return 1 if result.failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict landmarks for a folder of images")
    p.add_argument("run", help="fine-tuning run folder (runs/<name>)")
    p.add_argument("--images", required=True,
                   help="folder of images (searched recursively), or one image file")
    p.add_argument("--out", required=True, help="CSV to write (points in each file's pixels)")
    p.add_argument("--overlay", default=None,
                   help="folder for one PNG per image with the numbered predictions")
    p.add_argument("--weights", default="best",
                   help="best (default; export/ when there was no validation), export, or a "
                        "saved regressor folder")
    p.add_argument("--flip-tta", action="store_true",
                   help="average with the mirrored image (needs a left/right permutation)")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="mm per pixel of the files (x [y]), for conformal radii in mm when the "
                        "run is calibrated (without it, spread radii are in pixels)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: eval.batch_size of the run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. decoder.name=argmax")
    p.set_defaults(func=cmd_predict)
