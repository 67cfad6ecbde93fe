"""A cheaper local network for the +50 % speed bound: the study's refinement re-trained with
the `patch_micro` U-Net (4 levels of 4/8/16/32 channels, no attention: half of `patch_lite`'s
CPU time per patch, as many parameters), paired image by image with the study's `patch_lite`
refinement of the same stage-1 run, on each run's own 10 validation images (the choice) and on
ISBI Test1 (the report).

    .venv/bin/python experiments/results/label-efficiency/local-network/compare.py score \
        [runs/grids/label-efficiency] [--part 1/2 --out part1.csv.gz]
    .venv/bin/python experiments/results/label-efficiency/local-network/compare.py summarise

The choice, fixed before the re-trained runs were scored: patch_micro replaces patch_lite in
configs/finetune/isbi2015_refine.yaml if its validation MRE, paired image by image over every
cell's validation images, is at most TOLERANCE_MM above patch_lite's on average (the rule of
share-radius/). Test1 is reported, never used for the choice.

Both refinements of a cell are found by their config.yaml: the study's settings (shared
patches of radius 8, every visible landmark supervised, one refinement) and model.preset.
Scoring goes through the same TwoStagePredictor as `evaluate` (share-radius/sweep.py's score).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.splits import dataset_fewshot_split
from ddpm_landmarks.inference.runs import load_trained_run
from ddpm_landmarks.studies.paired_stats import bootstrap_mean_ci, t_interval
from ddpm_landmarks.utils.atomic import atomic_path, atomic_write_text

HERE = Path(__file__).resolve().parent
PRESETS = ("patch_lite", "patch_micro")          # baseline, candidate
TOLERANCE_MM = 0.02
FIELDS = ["cell", "init", "budget", "seed", "preset", "split", "image", "mre", "patches"]
_spec = importlib.util.spec_from_file_location("sweep", HERE.parent / "share-radius" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def refinement_with(cell_dir: Path, preset: str) -> Path | None:
    """The cell's finished refinement with the study's settings and this local network."""
    for folder in sorted(cell_dir.glob("refine-*")):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        refine = cfg["refine"]
        if ((folder / "refine.json").is_file() and cfg["model"]["preset"] == preset
                and float(refine.get("share_radius") or 0) == 8
                and refine.get("supervise") == "visible" and refine.get("iterations") == 1):
            return folder
    return None


def score_cells(grid: Path, part: str, out: Path) -> None:
    k, n = map(int, part.split("/"))
    rows, started = [], time.time()
    for cell_dir in sorted((grid / "cells").iterdir())[k - 1::n]:
        folders = {p: refinement_with(cell_dir, p) for p in PRESETS}
        if None in folders.values():
            continue
        cell = json.loads((cell_dir / "cell.json").read_text())
        for preset, folder in folders.items():
            run = load_trained_run(folder, "best", [], device="cpu")
            dataset = build_dataset(run.cfg.data)
            split, _, val_pool = dataset_fewshot_split(dataset, run.cfg.data.train_split,
                                                       run.cfg.fewshot)
            assert list(split.val_ids) == (folder / "split_val_ids.txt").read_text().split()
            for name, data in (("val", val_pool.subset(split.val_ids)),
                               ("test1", dataset.split("test1"))):
                for image, mre, patches in sweep.score(run, data):
                    rows.append({"cell": cell_dir.name, "init": cell["init"],
                                 "budget": cell["budget"], "seed": cell["seed"],
                                 "preset": preset, "split": name, "image": image,
                                 "mre": f"{mre:.6f}", "patches": patches})
        print(f"{cell_dir.name}: done ({time.time() - started:.0f} s)", flush=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out) as tmp:
        tmp.write_bytes(gzip.compress(buffer.getvalue().encode(), mtime=0))
    print(f"{len(rows)} rows -> {out} in {time.time() - started:.0f} s")


def load(paths: list[Path]) -> dict:
    """{(split, preset): {(cell, image): (mre, patches, init, budget, seed)}}"""
    table: dict = defaultdict(dict)
    for path in paths:
        with gzip.open(path, "rt", newline="") as fh:
            for r in csv.DictReader(fh):
                table[(r["split"], r["preset"])][(r["cell"], r["image"])] = (
                    float(r["mre"]), int(r["patches"]), r["init"], int(r["budget"]),
                    int(r["seed"]))
    return table


def summarise(paths: list[Path]) -> None:
    table = load(paths)
    base, cand = PRESETS
    lines = [f"| split | cells | images | {base} MRE | {cand} MRE | {cand} - {base} "
             "[95 % bootstrap over images] |", "|---|---|---|---|---|---|"]
    verdict = ""
    for split in ("val", "test1"):
        a, b = table[(split, base)], table[(split, cand)]
        keys = sorted(set(a) & set(b))
        d = np.array([b[k][0] - a[k][0] for k in keys])
        low, high = bootstrap_mean_ci(d, seed=0)
        lines.append(f"| {split} | {len({k[0] for k in keys})} | {len(keys)} | "
                     f"{np.mean([a[k][0] for k in keys]):.3f} | "
                     f"{np.mean([b[k][0] for k in keys]):.3f} | "
                     f"{d.mean():+.3f} [{low:+.3f}, {high:+.3f}] |")
        if split == "val":
            verdict = ("adopted" if d.mean() <= TOLERANCE_MM else "not adopted")
    lines += ["", f"Rule (fixed beforehand): {cand} is adopted if its mean paired validation "
              f"difference is at most {TOLERANCE_MM} mm. Verdict: **{cand} {verdict}**.", "",
              f"Test1 per init and budget: final MRE of each, per seed the mean paired "
              f"difference {cand} - {base} over the 150 images, and the 95 % t interval over "
              "seeds.", "", f"| init | N | {base} | {cand} | per seed | over seeds [95 % t] |",
              "|---|---|---|---|---|---|"]
    a, b = table[("test1", base)], table[("test1", cand)]
    groups: dict = defaultdict(lambda: defaultdict(list))
    for k in sorted(set(a) & set(b)):
        _, _, init, budget, seed = a[k]
        groups[(init, budget)][seed].append((a[k][0], b[k][0]))
    for (init, budget), seeds in sorted(groups.items()):
        per_seed = [np.mean([y - x for x, y in pairs]) for pairs in seeds.values()]
        pairs = [p for ps in seeds.values() for p in ps]
        row = f"| {init} | {budget} | {np.mean([p[0] for p in pairs]):.3f} | " \
              f"{np.mean([p[1] for p in pairs]):.3f} | " + \
              ", ".join(f"{x:+.3f}" for x in per_seed)
        if len(per_seed) > 1:
            mean, low, high = t_interval(per_seed)
            row += f" | {mean:+.3f} [{low:+.3f}, {high:+.3f}] |"
        else:
            row += " | one seed |"
        lines.append(row)
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["score", "summarise"])
    parser.add_argument("grid", nargs="?", default="runs/grids/label-efficiency")
    parser.add_argument("--part", default="1/1", help="k/n: every n-th cell from the k-th")
    parser.add_argument("--out", default=str(HERE / "per_image.csv.gz"))
    parser.add_argument("--inputs", nargs="+", default=[str(HERE / "per_image.csv.gz")],
                        help="summarise: the scored CSVs")
    args = parser.parse_args()
    if args.command == "score":
        score_cells(Path(args.grid), args.part, Path(args.out))
    else:
        summarise([Path(p) for p in args.inputs])


if __name__ == "__main__":
    main()
