"""Two refinements of the same stage-1 runs, paired image by image: a patch per landmark
(refine.share_radius = 0, the study's first refinement) against patches shared by nearby
landmarks (share_radius > 0), on ISBI Test1.

    .venv/bin/python experiments/results/label-efficiency/shared-patches/compare_refinements.py \
        [runs/grids/label-efficiency]

Every cell folder of the grid with one finished refinement of each kind (refine-*/ with
eval_test1/metrics.json) gives one paired comparison (final points; stage 1 is the same run):
the per-image mean radial error, shared - per landmark, its bootstrap interval and Wilcoxon
p within the seed; per init and budget, the 95 % t interval of the per-seed mean differences
over seeds. The cost is the local network's patch forwards per image: the evaluation's
refine_patches_per_image where recorded, else the sum of refine.json's per-landmark
iterations (a patch per landmark and iteration). Writes compare.md and compare.csv next to
this script.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from ddpm_landmarks.studies.paired_comparison import compare_pair, per_image_errors, verdict
from ddpm_landmarks.studies.paired_stats import t_interval
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent


def refinement(folder: Path) -> dict | None:
    """A finished refinement run: its share radius, metrics, per-image errors and cost."""
    metrics_file = folder / "eval_test1" / "metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    iterations = json.loads((folder / "refine.json").read_text())["iterations"]
    patches = metrics.get("refine_patches_per_image", float(sum(iterations)))
    return {"share_radius": float(cfg["refine"].get("share_radius") or 0.0),
            "mre": metrics["mre"], "sdr2": metrics["sdr"]["2"],
            "stage1_mre": metrics["stage1"]["mre"], "patches": patches,
            "refined": sum(1 for i in iterations if i > 0),
            "errors": per_image_errors(folder / "eval_test1")}


def main(grid_dir: Path) -> None:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for cell_dir in sorted((grid_dir / "cells").iterdir()):
        if not (cell_dir / "cell.json").is_file():
            continue
        cell = json.loads((cell_dir / "cell.json").read_text())
        runs = [r for r in map(refinement, sorted(cell_dir.glob("refine-*"))) if r]
        own = [r for r in runs if r["share_radius"] == 0]
        shared = [r for r in runs if r["share_radius"] > 0]
        if len(own) != 1 or len(shared) != 1:
            continue
        pair = compare_pair(shared[0]["errors"], own[0]["errors"], seed=cell["seed"])
        groups[(cell["init"], cell["budget"])].append(
            {"seed": cell["seed"], "own": own[0], "shared": shared[0], "pair": pair})
    rows = []
    for (init, budget), seeds in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seeds.sort(key=lambda s: s["seed"])
        mean, low, high = t_interval([s["pair"]["mean_diff"] for s in seeds])
        avg = lambda kind, key: float(np.mean([s[kind][key] for s in seeds]))  # noqa: E731
        sd = lambda kind, key: float(np.std([s[kind][key] for s in seeds], ddof=1))  # noqa: E731
        rows.append({
            "init": init, "budget": budget, "seeds": " ".join(str(s["seed"]) for s in seeds),
            "share_radius": seeds[0]["shared"]["share_radius"],
            "stage1_mre": avg("own", "stage1_mre"),
            "own_mre": avg("own", "mre"), "own_mre_sd": sd("own", "mre"),
            "shared_mre": avg("shared", "mre"), "shared_mre_sd": sd("shared", "mre"),
            "own_sdr2": avg("own", "sdr2"), "shared_sdr2": avg("shared", "sdr2"),
            "own_patches": avg("own", "patches"), "shared_patches": avg("shared", "patches"),
            "own_refined": avg("own", "refined"), "shared_refined": avg("shared", "refined"),
            "diff": mean, "t_low": low, "t_high": high,
            "per_seed": "; ".join(f"s{s['seed']} {s['pair']['mean_diff']:+.3f} "
                                  f"(p={s['pair']['wilcoxon_p']:.2g})" for s in seeds),
            "verdict": verdict(low, high, "shared", "per landmark")})
    if not rows:
        raise SystemExit(f"{grid_dir}: no cell has both a per-landmark and a shared refinement")
    lines = ["| init | N | seeds | stage 1 MRE | per landmark: MRE / SDR 2 mm / patches per "
             "image | shared: MRE / SDR 2 mm / patches per image | shared - per landmark "
             "(95 % t) | per seed (Wilcoxon p) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['init']} | {r['budget']} | {r['seeds']} | {r['stage1_mre']:.2f} | "
            f"{r['own_mre']:.2f} ± {r['own_mre_sd']:.2f} / {r['own_sdr2']:.1f} % / "
            f"{r['own_patches']:.1f} | {r['shared_mre']:.2f} ± {r['shared_mre_sd']:.2f} / "
            f"{r['shared_sdr2']:.1f} % / {r['shared_patches']:.1f} | {r['diff']:+.3f} "
            f"[{r['t_low']:+.3f}, {r['t_high']:+.3f}] | {r['per_seed']} | {r['verdict']} |")
    atomic_write_text(HERE / "compare.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(HERE / "compare.csv", buf.getvalue())
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/grids/label-efficiency"))
