"""Stage 1 at 128 px, and a finer refinement grid, against the study's 64 px pipeline, paired:
the same init, budget and seed (so the same few-shot draw, validation images and training
seed) in runs/grids/label-efficiency-128 and runs/grids/label-efficiency, per Test1 image (its
mean radial error over the landmarks).

    .venv/bin/python experiments/results/label-efficiency/resolution/compare.py

Variants of a cell: its stage 1 alone, and each finished refinement of it with the study's
settings (patch_lite, shared patches of radius 8, one refinement chosen per landmark), told
apart by refine.grid: 256 (0.94 mm per patch pixel, the study's) or 512 (0.47 mm). Each is
compared with the study's shipped pipeline, "64 px + grid 256". Per seed: the mean difference
with a bootstrap 95 % interval over the 150 images and the Wilcoxon p; over seeds, the t
interval (seeds - 1 degrees of freedom). The validation column is what a choice between
variants rests on: each refinement's 10 validation images (refine.json), stage 1 / every
landmark refined once / the per-landmark choice (the last is optimistic: chosen on the same
images). Writes results.md next to this script.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from ddpm_landmarks.studies.paired_comparison import compare_pair, per_image_errors
from ddpm_landmarks.studies.paired_stats import t_interval
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
GRID_128, GRID_64 = Path("runs/grids/label-efficiency-128"), Path("runs/grids/label-efficiency")
BASE = "64 px + grid 256"


def cells(grid: Path) -> dict[tuple[str, int, int], Path]:
    """{(init, budget, seed): cell folder} of every cell with a finished stage 1."""
    out = {}
    for path in sorted((grid / "cells").glob("*/cell.json")):
        cell = json.loads(path.read_text())
        if (path.parent / "best").is_dir():
            out[(cell["init"], int(cell["budget"]), int(cell["seed"]))] = path.parent
    return out


def variants(cell_dir: Path, size: int) -> dict[str, tuple[Path, str]]:
    """{label: (Test1 evaluation folder, validation MREs)} of one cell."""
    out = {}
    for folder in sorted(cell_dir.glob("refine-*")):
        if not (folder / "refine.json").is_file() or not (folder / "eval_test1").is_dir():
            continue
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        refine = cfg["refine"]
        if (cfg["model"]["preset"] != "patch_lite" or float(refine.get("share_radius") or 0) != 8
                or refine.get("supervise") != "visible" or refine["iterations"] != 1):
            continue
        saved = json.loads((folder / "refine.json").read_text())
        by_it = saved["validation"]["mre_by_iterations"]
        per = np.array(saved["validation"]["per_landmark_mre_by_iterations"])
        chosen = per[np.arange(len(per)), saved["iterations"]].mean()
        out[f"{size} px stage 1"] = (folder / "eval_test1" / "stage1", f"{by_it[0]:.2f}")
        out[f"{size} px + grid {refine['grid']}"] = (
            folder / "eval_test1", f"{by_it[0]:.2f} / {by_it[1]:.2f} / {chosen:.2f}")
    return out


def main() -> None:
    high, low = cells(GRID_128), cells(GRID_64)
    groups: dict = defaultdict(list)
    for key in sorted(low):
        found = {**variants(low[key], 64), **(variants(high[key], 128) if key in high else {})}
        if len(found) < 3:                  # the study's refinement only: nothing to compare
            continue
        base = per_image_errors(found[BASE][0])
        for label, (eval_dir, val) in found.items():
            stats = compare_pair(per_image_errors(eval_dir), base)
            stats["sdr2"] = json.loads((eval_dir / "metrics.json").read_text())["sdr"]["2"]
            groups[(key[0], key[1], label)].append((key[2], stats, val))
    lines = [f"| init | N | variant | seeds | validation MRE per seed | Test1 MRE | SDR 2 mm | - {BASE} over "
             "seeds [95 % t] | per seed: difference [bootstrap 95 %], Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (init, budget, label), per_seed in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], int(kv[0][2].split()[0]), kv[0][2])):
        diffs = [s["mean_diff"] for _, s, _ in per_seed]
        over = "one seed"
        if len(diffs) > 1:
            mean, lo, hi = t_interval(diffs)
            over = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        mre = np.mean([s["first_mre"] for _, s, _ in per_seed])
        sdr2 = np.mean([s["sdr2"] for _, s, _ in per_seed])
        seeds = "; ".join(f"s{seed}: {s['mean_diff']:+.3f} [{s['ci_low']:+.3f}, "
                          f"{s['ci_high']:+.3f}], p={s['wilcoxon_p']:.2g}"
                          for seed, s, _ in per_seed)
        val = "; ".join(f"s{seed}: {v}" for seed, _, v in per_seed)
        lines.append(f"| {init} | {budget} | {label} | {len(per_seed)} | {val} | {mre:.3f} | "
                     f"{sdr2:.1f} % | {over if label != BASE else '(reference)'} | "
                     f"{seeds if label != BASE else ''} |")
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
