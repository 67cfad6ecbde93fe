"""Stage 1 at 128 px against the study's 64 px, paired: the same init, budget and seed (so the
same few-shot draw, validation images and training seed) in runs/grids/label-efficiency-128 and
runs/grids/label-efficiency, per Test1 image (its mean radial error over the landmarks), for
stage 1 and for the final (refined) points.

    .venv/bin/python experiments/results/label-efficiency/stage1-128/compare_64.py

Writes results.md next to this script: per seed, 128 - 64 px with a bootstrap 95 % interval
over the 150 images and the Wilcoxon p; over seeds, the t interval (seeds - 1 degrees of
freedom), as `ddpm-landmarks compare` does within one grid.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ddpm_landmarks.studies.paired_comparison import compare_pair, per_image_errors
from ddpm_landmarks.studies.paired_stats import t_interval
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
GRIDS = {"128": Path("runs/grids/label-efficiency-128"), "64": Path("runs/grids/label-efficiency")}


def finished_cells(grid: Path) -> dict[tuple[str, int, int], Path]:
    """{(init, budget, seed): the final evaluation folder} of every finished two-stage cell."""
    cells = {}
    for path in sorted((grid / "cells").glob("*/cell.json")):
        cell = json.loads(path.read_text())
        if cell.get("status") == "done" and cell.get("refine_run_dir"):
            cells[(cell["init"], int(cell["budget"]), int(cell["seed"]))] = Path(cell["eval_dir"])
    return cells


def main() -> None:
    high, low = finished_cells(GRIDS["128"]), finished_cells(GRIDS["64"])
    groups: dict = defaultdict(list)
    for key in sorted(set(high) & set(low)):
        for stage, sub in (("stage 1", "stage1"), ("final", ".")):
            stats = compare_pair(per_image_errors(high[key] / sub), per_image_errors(low[key] / sub))
            groups[(key[0], key[1], stage)].append((key[2], stats))
    lines = ["| init | N | stage | seeds | MRE 128 / 64 px (mm) | 128 - 64 over seeds [95 % t] | "
             "per seed: 128 - 64 [bootstrap 95 %], Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for (init, budget, stage), per_seed in sorted(groups.items()):
        diffs = [s["mean_diff"] for _, s in per_seed]
        over = (f"{t_interval(diffs)[0]:+.3f} [{t_interval(diffs)[1]:+.3f}, "
                f"{t_interval(diffs)[2]:+.3f}]" if len(diffs) > 1 else "one seed")
        mre = (sum(s["first_mre"] for _, s in per_seed) / len(per_seed),
               sum(s["second_mre"] for _, s in per_seed) / len(per_seed))
        seeds = "; ".join(f"s{seed}: {s['mean_diff']:+.3f} [{s['ci_low']:+.3f}, "
                          f"{s['ci_high']:+.3f}], p={s['wilcoxon_p']:.2g}" for seed, s in per_seed)
        lines.append(f"| {init} | {budget} | {stage} | {len(per_seed)} | {mre[0]:.3f} / "
                     f"{mre[1]:.3f} | {over} | {seeds} |")
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
