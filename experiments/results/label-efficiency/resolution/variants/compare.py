"""Refinement variants on finished stage-1 runs (N = 50, seeds 0-2), paired per Test1 image
(its mean radial error over the landmarks), and DDPM against scratch at 128 px.

    experiments/results/label-efficiency/resolution/variants/run.sh ...   # see README.md
    .venv/bin/python experiments/results/label-efficiency/resolution/variants/compare.py

Table 1, each variant against the refinement it varies (grid 512, patch_lite, 32 px patches,
500 steps: "500 steps") of the same stage-1 run. A variant is chosen on validation, never on
Test1: the validation column is each refinement's 10 validation images (refine.json) with its
per-landmark choice of iterations, the number the refinement itself was selected on
(optimistic by the same amount for variants with the same number of choices; `iter2` chooses
among three, so it is more optimistic).

Table 2, DDPM - scratch on the same draws, stage 1 at 64 px (the study's cells) and at 128 px:
stage 1 alone, and refined with 500 or 2000 steps. The 2000-step refinements are run.sh's
(runs/variants64, runs/variants128), except DDPM's at 128 px: its grid cells'
(experiments/label-efficiency-128.yaml, the same settings).

Per seed: the mean difference with a bootstrap 95 % interval over the 150 images and the
Wilcoxon p; over seeds, the t interval (seeds - 1 degrees of freedom). Writes results.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ddpm_landmarks.studies.paired_comparison import compare_pair, per_image_errors
from ddpm_landmarks.studies.paired_stats import t_interval
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
GRID_128, GRID_64 = Path("runs/grids/label-efficiency-128/cells"), Path("runs/grids/label-efficiency/cells")
VARIANTS = {"steps1000": "train.max_steps=1000", "steps2000": "train.max_steps=2000",
            "iter2": "refine.iterations=2"}


def stage1_dirs(cells: Path, init: str) -> dict[int, Path]:
    """{seed: cell folder} of the N = 50 cells of one init with a finished stage 1."""
    return {int(p.name.split("-s")[-1].split("-")[0]): p
            for p in sorted(cells.glob(f"isbi2015-{init}-N50-s*")) if (p / "best").is_dir()}


def refinement(cell: Path, steps: int) -> Optional[Path]:
    """The cell's evaluated grid-512 refinement (patch_lite, one iteration) with that many steps."""
    for folder in sorted(cell.glob("refine-*")):
        if not (folder / "eval_test1" / "metrics.json").is_file():
            continue
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        if (cfg["refine"]["grid"] == 512 and cfg["model"]["preset"] == "patch_lite"
                and cfg["refine"]["iterations"] == 1 and cfg["train"]["max_steps"] == steps):
            return folder
    return None


def validation_mre(run: Path) -> float:
    """Validation MRE of a refinement with its per-landmark choice of iterations."""
    saved = json.loads((run / "refine.json").read_text())
    per = np.array(saved["validation"]["per_landmark_mre_by_iterations"])
    return float(per[np.arange(len(per)), saved["iterations"]].mean())


def summary(per_seed: list[tuple[int, dict, float]]) -> tuple[str, str, str, str]:
    """(first's Test1 MRE, its SDR 2 mm, over-seeds interval, per-seed details)."""
    mre = np.mean([s["first_mre"] for _, s, _ in per_seed])
    sdr2 = np.mean([sdr for _, _, sdr in per_seed])
    diffs = [s["mean_diff"] for _, s, _ in per_seed]
    over = "one seed"
    if len(diffs) > 1:
        mean, lo, hi = t_interval(diffs)
        over = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    seeds = "; ".join(f"s{seed}: {s['mean_diff']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], "
                      f"p={s['wilcoxon_p']:.2g}" for seed, s, _ in per_seed)
    return f"{mre:.3f}", f"{sdr2:.1f} %", over, seeds


def sdr2(eval_dir: Path) -> float:
    return json.loads((eval_dir / "metrics.json").read_text())["sdr"]["2"]


def variant_rows(label: str, bases: dict[int, Path], out_dir: Path, prefix: str) -> list[str]:
    """Rows of table 1 for one stage-1 set: its 500-step refinement, then each variant."""
    rows = []
    base_runs = {s: refinement(cell, 500) for s, cell in bases.items()}
    base_runs = {s: r for s, r in base_runs.items() if r is not None}
    runs_by = {"500 steps": base_runs}
    for name, override in VARIANTS.items():
        found = {s: out_dir / f"{name}-{prefix}s{s}" for s in base_runs}
        runs_by[f"`{override}`"] = {s: r for s, r in found.items()
                                    if (r / "eval_test1" / "metrics.json").is_file()}
    for variant, runs in runs_by.items():
        if not runs:
            continue
        per_seed = [(s, compare_pair(per_image_errors(r / "eval_test1"),
                                     per_image_errors(base_runs[s] / "eval_test1")),
                     sdr2(r / "eval_test1")) for s, r in sorted(runs.items())]
        val = "; ".join(f"s{s}: {validation_mre(r):.3f} ({validation_mre(r) - validation_mre(base_runs[s]):+.3f})"
                        for s, r in sorted(runs.items()))
        mre, sdr, over, seeds = summary(per_seed)
        if variant == "500 steps":
            over, seeds = "(reference)", ""
        rows.append(f"| {label} | {variant} | {len(runs)} | {val} | {mre} | {sdr} | {over} | {seeds} |")
    return rows


def ddpm_vs_scratch(size: int) -> list[str]:
    """Rows of table 2 at one stage-1 size: DDPM - scratch per stage, paired on the same draws."""
    cells = GRID_128 if size == 128 else GRID_64
    ddpm, scratch = stage1_dirs(cells, "ddpm"), stage1_dirs(cells, "scratch")

    def long_refinement(init: str, seed: int, cell: Path) -> Optional[Path]:
        if size == 128 and init == "ddpm":          # the grid ran it
            found = refinement(cell, 2000)
            return found / "eval_test1" if found else None
        prefix = "" if size == 128 else f"{init}-"
        return Path(f"runs/variants{size}/steps2000-{prefix}s{seed}/eval_test1")

    def first(*found: Optional[Path]) -> Optional[Path]:
        return next((f for f in found if f is not None), None)

    stages = {
        "stage 1": lambda init, s, cell: (first(refinement(cell, 500), refinement(cell, 2000))
                                          / "eval_test1" / "stage1"),
        "refined, 500 steps": lambda init, s, cell: refinement(cell, 500) / "eval_test1",
        "refined, 2000 steps": long_refinement,
    }
    rows = []
    for stage, where in stages.items():
        per_seed = []
        for s in sorted(set(ddpm) & set(scratch)):
            try:
                a, b = where("ddpm", s, ddpm[s]), where("scratch", s, scratch[s])
            except TypeError:               # a refinement not run (yet)
                continue
            if a is None or b is None or not ((a / "predictions.csv").is_file()
                                              and (b / "predictions.csv").is_file()):
                continue
            stats = compare_pair(per_image_errors(a), per_image_errors(b))
            per_seed.append((s, stats, sdr2(a), sdr2(b)))
        if not per_seed:
            continue
        mre, sdr, over, seeds = summary([(s, st, x) for s, st, x, _ in per_seed])
        scratch_mre = np.mean([st["second_mre"] for _, st, _, _ in per_seed])
        scratch_sdr = np.mean([y for _, _, _, y in per_seed])
        rows.append(f"| {size} px | {stage} | {len(per_seed)} | {mre} / {scratch_mre:.3f} | "
                    f"{sdr} / {scratch_sdr:.1f} % | {over} | {seeds} |")
    return rows


def main() -> None:
    lines = ["## Refinement variants (each against the 500-step refinement of the same stage-1 run)",
             "", "| stage 1 | variant | seeds | validation MRE per seed (- 500 steps) | Test1 MRE | "
             "SDR 2 mm | - 500 steps over seeds [95 % t] | per seed: difference [bootstrap 95 %], Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|"]
    lines += variant_rows("scratch, 128 px", stage1_dirs(GRID_128, "scratch"), Path("runs/variants128"), "")
    for init in ("scratch", "ddpm", "ddpm_long"):
        lines += variant_rows(f"{init}, 64 px", stage1_dirs(GRID_64, init), Path("runs/variants64"), f"{init}-")
    lines += ["", "## DDPM - scratch (same draws)", "",
              "| stage 1 size | points | seeds | Test1 MRE, DDPM / scratch | SDR 2 mm, DDPM / scratch | DDPM - scratch "
              "over seeds [95 % t] | per seed: difference [bootstrap 95 %], Wilcoxon p |",
              "|---|---|---|---|---|---|---|"]
    lines += ddpm_vs_scratch(64) + ddpm_vs_scratch(128)
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
