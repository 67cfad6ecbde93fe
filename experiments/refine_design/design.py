"""Design measurements of the refinement stage on DEVELOPMENT images: the Train images that
are neither labelled nor validation images of the stage-1 run (90 of ISBI's 150 at N = 50),
never Test1.

    python experiments/refine_design/design.py RUN [RUN ...] --out design.md \
        [--prior 0 1] [--max-shift none 4] [--iterations 2]

For each refinement run (its stage 1 inside) and each inference setting (prior weight x
displacement limit) every landmark is refined up to --iterations times (explore mode) and
scored after 0 (stage 1), 1, ... refinements, and with the run's own per-landmark choice
(refine.json, made on its 10 validation images). Rows go to a Markdown table (MRE, SDR 2 mm,
SDR 4 mm) and a CSV of per-landmark MREs next to it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import load_split
from ddpm_landmarks.evaluation.evaluate import ground_truths
from ddpm_landmarks.evaluation.metrics import measurement_scale, radial_errors, summarize
from ddpm_landmarks.inference.runs import load_trained_run
from ddpm_landmarks.inference.two_stage import (
    PatchRefiner,
    RefineSettings,
    TwoStagePredictor,
    predict_samples,
)


def development_images(run):
    """Train images outside the run's labelled and validation images."""
    pool = build_dataset(run.cfg.data).split(run.cfg.data.train_split)
    split = load_split(run.run_dir)
    used = set(split.train_ids) | set(split.val_ids)
    return pool.subset([i for i in pool.ids if i not in used])


def score(errors: np.ndarray) -> dict:
    s = summarize(errors, [2.0, 4.0])
    return {"mre": s["mre"], "sdr2": s["sdr"][2.0], "sdr4": s["sdr"][4.0]}


def measure(run_dir: Path, priors, shifts, iterations: int) -> list[dict]:
    run = load_trained_run(run_dir, device="cpu")
    dev = development_images(run)
    gt = np.stack([t.landmarks for t in ground_truths(dev)])
    scales = np.array([measurement_scale(dev, dev[i])[0] for i in range(len(dev))])
    info = run.refine.info or {}
    chosen = np.array(info.get("iterations", [iterations] * gt.shape[1]))
    rows = []
    for prior in priors:
        for shift in shifts:
            cfg = dataclasses.replace(run.cfg, refine=dataclasses.replace(
                run.cfg.refine, prior_weight=prior))
            settings = RefineSettings.uniform(gt.shape[1], iterations, shift,
                                              info.get("unit_per_patch_pixel"))
            refiner = PatchRefiner(run.refine.model, cfg, settings, device="cpu")
            t0 = time.time()
            out = predict_samples(TwoStagePredictor(run.predictor(), refiner), dev, cfg.data,
                                  cfg.augment, 16, explore=True).output
            errors = [radial_errors(h, gt, scales) for h in out.history]
            selected = np.stack(errors)[np.minimum(chosen, len(errors) - 1),
                                        :, np.arange(gt.shape[1])].T     # (N, K)
            row = {"run": run_dir.name, "prior": prior, "max_shift": shift,
                   "images": len(dev), "seconds": time.time() - t0}
            for i, e in enumerate(errors):
                row.update({f"it{i}_{k}": v for k, v in score(e).items()})
                row[f"it{i}_per_landmark"] = np.nanmean(np.where(np.isinf(e), np.nan, e), 0)
            row.update({f"sel_{k}": v for k, v in score(selected).items()})
            rows.append(row)
            print(f"{run_dir.name} prior {prior} shift {shift}: stage 1 {row['it0_mre']:.3f}, "
                  + ", ".join(f"{i} it {row[f'it{i}_mre']:.3f}" for i in range(1, len(errors)))
                  + f", selected {row['sel_mre']:.3f} mm", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], iterations: int) -> str:
    cols = ["stage 1"] + [f"{i} it" for i in range(1, iterations + 1)] + ["selected"]
    keys = [f"it{i}" for i in range(iterations + 1)] + ["sel"]
    head = ["run", "prior", "max shift (mm)"] + [f"{c} MRE / SDR2 / SDR4" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['prior']:g}", "-" if r["max_shift"] is None else
                 f"{r['max_shift']:g}"]
        cells += [f"{r[f'{k}_mre']:.3f} / {r[f'{k}_sdr2']:.1f} / {r[f'{k}_sdr4']:.1f}"
                  for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--prior", nargs="+", type=float, default=[0.0])
    p.add_argument("--max-shift", nargs="+", default=["none"])
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shifts = [None if s == "none" else float(s) for s in args.max_shift]
    rows = [r for run in args.runs for r in measure(run, args.prior, shifts, args.iterations)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args.iterations))
    with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "prior", "max_shift", "iterations", "landmark", "mre"])
        for r in rows:
            for i in range(args.iterations + 1):
                for k, v in enumerate(r[f"it{i}_per_landmark"]):
                    writer.writerow([r["run"], r["prior"], r["max_shift"], i, k, f"{v:.4f}"])
    print(markdown(rows, args.iterations))


if __name__ == "__main__":
    main()
