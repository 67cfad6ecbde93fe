"""How large may the shared patches be? The study's refinement runs trained with
refine.share_radius = T (--trained, default 8) applied with radius R at inference (--radii),
on each run's own validation images (the choice) and on ISBI Test1 (the report).

    .venv/bin/python experiments/results/label-efficiency/share-radius/sweep.py \
        [runs/grids/label-efficiency] [--trained 8] [--radii 8 10 12 15] \
        [--part 1/2 --out part1.csv]

For every cell of the grid with a finished refinement trained with radius T (refine-*/ whose
config has share_radius = T) and every R: both stages on the run's 10 validation images (the
held-out training images its per-landmark choice was made on) and on Test1, through the same
TwoStagePredictor `evaluate` uses (load_trained_run with the override refine.share_radius=R).
Writes per_image.csv.gz (cell, trained and applied radius, split, image, mean radial error in
mm over its landmarks, patches through the local network) next to this script (rows of
several --part runs or radii: concatenate); summarise.py makes the report.
With T = 8, R > 8 asks whether training needs to change at all: the patch centre moved
uniformly within 8 patch px and every visible landmark was supervised, so a landmark 12 px
from a patch's centre is still inside what the network was trained on (a 32 px patch reaches
16 px).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import time
from pathlib import Path

import numpy as np
import yaml

from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import dataset_fewshot_split
from ddpm_landmarks.evaluation.evaluate import ground_truths
from ddpm_landmarks.evaluation.metrics import radial_errors
from ddpm_landmarks.inference.runs import load_trained_run, unit_scales
from ddpm_landmarks.inference.two_stage import predict_samples
from ddpm_landmarks.utils.atomic import atomic_path

HERE = Path(__file__).resolve().parent
FIELDS = ["cell", "init", "budget", "seed", "trained", "radius", "split", "image", "mre", "patches"]


def refinement_trained_with(cell_dir: Path, radius: float) -> Path | None:
    for folder in sorted(cell_dir.glob("refine-*")):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        trained = float(cfg["refine"].get("share_radius") or 0)
        if (folder / "refine.json").is_file() and trained == radius:
            return folder
    return None


def score(run, dataset) -> list[tuple[str, float, int]]:
    """(image id, mean radial error over its landmarks, patches) for every image."""
    truths = ground_truths(dataset)
    out = predict_samples(run.two_stage_predictor(), dataset, run.cfg.data, run.cfg.augment,
                          run.cfg.eval.batch_size).output
    gt = np.stack([t.landmarks for t in truths])
    errors = radial_errors(out.final, gt, unit_scales(dataset, truths))
    assert np.isfinite(errors[np.isfinite(gt).all(-1)]).all(), "a missed landmark"
    return [(t.id, float(np.nanmean(e)), int(p)) for t, e, p in zip(truths, errors, out.patches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", nargs="?", default="runs/grids/label-efficiency")
    parser.add_argument("--trained", type=float, default=8.0)
    parser.add_argument("--radii", type=float, nargs="+", default=[8, 10, 12, 15])
    parser.add_argument("--out", default=str(HERE / "per_image.csv.gz"))
    parser.add_argument("--part", default="1/1", help="k/n: every n-th cell from the k-th "
                        "(parallel processes; concatenate their CSVs)")
    args = parser.parse_args()
    k, n = map(int, args.part.split("/"))
    rows, started = [], time.time()
    for cell_dir in sorted((Path(args.grid) / "cells").iterdir())[k - 1::n]:
        folder = refinement_trained_with(cell_dir, args.trained)
        if folder is None:
            continue
        cell = json.loads((cell_dir / "cell.json").read_text())
        for radius in args.radii:
            run = load_trained_run(folder, "best", [f"refine.share_radius={radius:g}"],
                                   device="cpu")
            dataset = build_dataset(run.cfg.data)
            split, _, val_pool = dataset_fewshot_split(dataset, run.cfg.data.train_split,
                                                       run.cfg.fewshot)
            # The run's own validation images, as it recorded them.
            assert list(split.val_ids) == (folder / "split_val_ids.txt").read_text().split()
            for name, data in (("val", val_pool.subset(split.val_ids)),
                               ("test1", dataset.split("test1"))):
                for image, mre, patches in score(run, data):
                    rows.append({"cell": cell_dir.name, "init": cell["init"],
                                 "budget": cell["budget"], "seed": cell["seed"],
                                 "trained": f"{args.trained:g}", "radius": f"{radius:g}", "split": name, "image": image,
                                 "mre": f"{mre:.6f}", "patches": patches})
        print(f"{cell_dir.name}: done ({time.time() - started:.0f} s)", flush=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_bytes(gzip.compress(buffer.getvalue().encode(), mtime=0))
    print(f"{len(rows)} rows -> {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
