"""The five-seed table of README.md: per init and budget, stage-1 and final MRE (mean ± sample
SD over the seeds), final SDR 2 mm and the final MRE per seed, from the cells' cell.json (the
metrics `evaluate` wrote on Test1). `ddpm-landmarks report` keeps to the experiment file's
seeds (0-2); this reads every finished seed.

    .venv/bin/python experiments/results/label-efficiency/five-seeds/table.py [runs/grids/label-efficiency]
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(grid: Path) -> None:
    cells: dict = defaultdict(dict)
    for path in sorted((grid / "cells").glob("*/cell.json")):
        cell = json.loads(path.read_text())
        if cell.get("status") == "done" and cell["init"] in ("ddpm", "scratch"):
            cells[(cell["init"], int(cell["budget"]))][int(cell["seed"])] = cell
    print("| init | N | seeds | stage 1 MRE | final MRE | final SDR 2 mm | final MRE per seed |")
    print("|---|---|---|---|---|---|---|")
    for (init, budget), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seeds = sorted(by_seed)
        final = np.array([by_seed[s]["metrics"]["mre"] for s in seeds])
        stage1 = np.array([by_seed[s]["stage1_metrics"]["mre"] for s in seeds])
        sdr2 = np.mean([by_seed[s]["metrics"]["sdr"]["2"] for s in seeds])
        print(f"| {init} | {budget} | {len(seeds)} | {stage1.mean():.2f} ± {stage1.std(ddof=1):.2f} "
              f"| {final.mean():.2f} ± {final.std(ddof=1):.2f} | {sdr2:.1f} % | "
              f"{', '.join(f'{x:.2f}' for x in final)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/grids/label-efficiency"))
