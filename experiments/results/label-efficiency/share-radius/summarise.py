"""The share-radius sweep's report (sweep.py wrote per_image.csv.gz): results.md, every
configuration "T/R" (trained with share radius T, applied with R) against the study's "8/8",
paired image by image.

    .venv/bin/python experiments/results/label-efficiency/share-radius/summarise.py

The choice, fixed before the sweep ran: among the configurations run on every cell, the one
with the fewest patches per validation image whose validation MRE, paired image by image with
8/8 over every cell's 10 validation images (36 cells: 360 pairs), is at most TOLERANCE_MM
above it on average. Test1 is reported, never used for the choice.
"""
from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np

from ddpm_landmarks.studies.paired_stats import bootstrap_mean_ci, t_interval
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
BASELINE = "8/8"
TOLERANCE_MM = 0.02
INITS = ("ddpm", "ddpm_long", "scratch")


def load(path: Path) -> dict:
    """{(split, "T/R"): {(cell, image): (mre, patches, init, budget, seed)}}"""
    table: dict = defaultdict(dict)
    with gzip.open(path, "rt", newline="") as fh:
        for r in csv.DictReader(fh):
            table[(r["split"], f"{r['trained']}/{r['radius']}")][(r["cell"], r["image"])] = (
                float(r["mre"]), int(r["patches"]), r["init"], int(r["budget"]), int(r["seed"]))
    return table


def paired(table, split: str, config: str, keep=lambda v: True) -> np.ndarray:
    base, other = table[(split, BASELINE)], table[(split, config)]
    keys = sorted(k for k in other if k in base and keep(base[k]))
    return np.array([other[k][0] - base[k][0] for k in keys])


def per_init_rows(table, config: str) -> list[str]:
    """Test1, config - 8/8 per init and budget: per-seed mean paired differences, t over seeds."""
    rows = []
    for init in INITS:
        for budget in sorted({v[3] for v in table[("test1", config)].values()}):
            seeds = sorted({v[4] for v in table[("test1", config)].values()
                            if v[2] == init and v[3] == budget})
            if not seeds:
                continue
            per_seed = [paired(table, "test1", config,
                               lambda v, s=s: v[2] == init and v[3] == budget and v[4] == s).mean()
                        for s in seeds]
            at = [np.mean([v[0] for k, v in table[("test1", c)].items()
                           if v[2] == init and v[3] == budget and v[4] in seeds
                           and k in table[("test1", config)]]) for c in (BASELINE, config)]
            mean, low, high = t_interval(per_seed)
            rows.append(f"| {init} | {budget} | {at[0]:.3f} | {at[1]:.3f} | "
                        f"{', '.join(f'{x:+.3f}' for x in per_seed)} | "
                        f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] |")
    return rows


def main() -> None:
    table = load(HERE / "per_image.csv.gz")
    configs = sorted({c for _, c in table}, key=lambda c: tuple(map(float, c.split("/"))))
    all_cells = {k[0] for k in table[("val", BASELINE)]}
    lines = ["| trained / applied radius (patch px) | cells | patches / image, val | Test1 "
             "| val MRE | val diff vs 8/8 [95 % bootstrap] | Test1 MRE | Test1 diff vs 8/8 "
             "[95 % bootstrap] |", "|---|---|---|---|---|---|---|---|"]
    chosen, fewest = BASELINE, np.inf
    for config in configs:
        cells = {k[0] for k in table[("val", config)]}
        patches = [np.mean([v[1] for v in table[(s, config)].values()]) for s in ("val", "test1")]
        row = [config, str(len(cells)), f"{patches[0]:.2f}", f"{patches[1]:.2f}"]
        for split in ("val", "test1"):
            d = paired(table, split, config)
            low, high = bootstrap_mean_ci(d, seed=0)
            mre = np.mean([v[0] for v in table[(split, config)].values()])
            row += [f"{mre:.3f}", f"{d.mean():+.3f} [{low:+.3f}, {high:+.3f}] ({len(d)} pairs)"]
            if (split == "val" and cells == all_cells and d.mean() <= TOLERANCE_MM
                    and patches[0] < fewest):
                chosen, fewest = config, patches[0]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Chosen on validation (of the configurations run on all {len(all_cells)} "
              f"cells, the fewest patches at most {TOLERANCE_MM} mm above {BASELINE} on "
              f"average): **{chosen}**."]
    for config in configs:
        if config == BASELINE:
            continue
        lines += ["", f"Test1, {config} - {BASELINE} per init and budget: per seed the mean "
                  "paired difference over the 150 images, and the 95 % t interval over seeds.",
                  "", f"| init | N | final MRE, {BASELINE} | {config} | per seed | over seeds "
                  "[95 % t] |", "|---|---|---|---|---|---|", *per_init_rows(table, config)]
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
