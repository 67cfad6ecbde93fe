"""Paired comparisons in a grid folder: does one initialisation beat another at each label
budget, beyond the spread over seeds, and does the refinement stage beat stage 1?

    ddpm-landmarks compare runs/grids/label-efficiency --a ddpm --b scratch

Pairs share everything but the compared thing: cells (a, N, s) and (b, N, s) are trained on the
same few-shot draw s with training seed s and scored on the same test images; stage 1 and the
final points of one cell are the same run. Per image, the error is the mean radial error over
its landmarks (from the evaluation's predictions.csv; a missed landmark is left out, and
counted). For every budget and stage (stage 1, final; a cell without refinement counts as
stage 1 beside two-stage cells) and for the refinement (final - stage 1 per init):
- within each seed: the per-image differences d_i = e_a(i) - e_b(i) (negative = a better),
  their mean with a percentile bootstrap 95 % interval over images, and the Wilcoxon
  signed-rank two-sided p (studies/paired_stats.py);
- over seeds: the per-seed mean differences, their mean and t interval with seeds - 1 degrees
  of freedom: the seed-to-seed spread (few-shot draw and training noise) is what a claim must
  beat. Verdict: "a better" / "b better" when that interval excludes 0, else "not resolved".
Written to <grid>/report/compare_<a>_vs_<b>.md and .csv.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from ddpm_landmarks.evaluation.metrics import csv_text
from ddpm_landmarks.experiments.report import STAGE1, expand_stages, load_cells
from ddpm_landmarks.studies.paired_stats import (
    bootstrap_mean_ci,
    t_interval,
    wilcoxon_signed_rank,
)
from ddpm_landmarks.utils.atomic import atomic_write_text


def per_image_errors(eval_dir: Path) -> dict[str, float]:
    """{image: mean radial error over its scored landmarks} from predictions.csv."""
    errors: dict[str, list[float]] = defaultdict(list)
    with open(Path(eval_dir) / "predictions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            value = float(row["error"]) if row["error"] not in ("", "inf") else math.nan
            if math.isfinite(value):
                errors[row["image"]].append(value)
    return {image: float(np.mean(v)) for image, v in errors.items()}


def compare_pair(first: dict[str, float], second: dict[str, float], seed: int = 0) -> dict:
    """Paired per-image statistics of first - second on their common images."""
    images = sorted(set(first) & set(second))
    d = np.array([first[i] - second[i] for i in images])
    low, high = bootstrap_mean_ci(d, seed=seed)
    _, _, p = wilcoxon_signed_rank(d)
    return {"images": len(images), "mean_diff": float(d.mean()) if d.size else math.nan,
            "ci_low": low, "ci_high": high, "wilcoxon_p": p,
            "first_mre": float(np.mean([first[i] for i in images])) if images else math.nan,
            "second_mre": float(np.mean([second[i] for i in images])) if images else math.nan}


def verdict(low: float, high: float, a: str, b: str) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not enough seeds"
    if high < 0:
        return f"{a} better"
    if low > 0:
        return f"{b} better"
    return "not resolved"


def _eval_dir(cell: dict) -> Optional[Path]:
    path = cell.get("eval_dir") or str(Path(cell["run_dir"]) / f"eval_{cell['eval_split']}")
    return Path(path) if (Path(path) / "predictions.csv").is_file() else None


def compare_grid(grid_dir: Path, a: str, b: str, dataset: Optional[str] = None) -> dict:
    """{"inits": rows of a vs b per budget and stage, "refine": final vs stage 1 per init and
    budget}; each row has the per-seed comparisons and the over-seeds interval."""
    cells = [c for c in expand_stages(load_cells(grid_dir)) if c.get("status") == "done"
             and (dataset is None or c["dataset"] == dataset)]
    # A one-stage cell's points are stage-1 points: in a grid that also has two-stage cells
    # (e.g. an init run without refinement) it is compared with the others' stage 1.
    two_stage = any(c.get("stage") for c in cells)
    by_key = {(c["dataset"], c["init"], c.get("budget_label"),
               c.get("stage") or (STAGE1 if two_stage else ""), c["seed"]): c for c in cells}
    known = sorted({c["init"] for c in cells})
    missing = [name for name in (a, b) if name not in known]
    if missing:
        raise ValueError(f"{grid_dir}: no finished cells of init {', '.join(missing)}; inits "
                         f"with finished cells: {', '.join(known) or 'none'}")
    inits_rows, refine_rows = [], []
    groups = sorted({(k[0], k[2], k[3]) for k in by_key}, key=lambda g: (g[0], _num(g[1]), g[2]))
    for ds, budget, stage in groups:
        seeds = sorted({k[4] for k in by_key if (k[0], k[2], k[3]) == (ds, budget, stage)})
        pairs = [(s, by_key.get((ds, a, budget, stage, s)), by_key.get((ds, b, budget, stage, s)))
                 for s in seeds]
        pairs = [(s, x, y) for s, x, y in pairs if x and y and _eval_dir(x) and _eval_dir(y)]
        if pairs:
            inits_rows.append(_row(ds, budget, stage, a, b, [
                (s, compare_pair(per_image_errors(_eval_dir(x)), per_image_errors(_eval_dir(y)),
                                 seed=s)) for s, x, y in pairs]))
    for ds, budget, stage in groups:
        if stage != STAGE1:
            continue
        for init in sorted({k[1] for k in by_key if (k[0], k[2], k[3]) == (ds, budget, stage)}):
            seeds = sorted({k[4] for k in by_key if k[:4] == (ds, init, budget, STAGE1)})
            per_seed = []
            for s in seeds:
                first, final = by_key.get((ds, init, budget, STAGE1, s)), \
                    by_key.get((ds, init, budget, "final", s))
                if first and final and _eval_dir(first) and _eval_dir(final):
                    per_seed.append((s, compare_pair(per_image_errors(_eval_dir(final)),
                                                     per_image_errors(_eval_dir(first)), seed=s)))
            if per_seed:
                refine_rows.append(_row(ds, budget, init, "final", "stage 1", per_seed))
    return {"inits": inits_rows, "refine": refine_rows}


def _num(budget) -> float:
    try:
        return float(budget)
    except (TypeError, ValueError):
        return math.inf


def _row(dataset, budget, label, a, b, per_seed: list[tuple[int, dict]]) -> dict:
    mean, low, high = t_interval([r["mean_diff"] for _, r in per_seed])
    return {"dataset": dataset, "budget": budget, "label": label, "a": a, "b": b,
            "seeds": [s for s, _ in per_seed], "per_seed": [r for _, r in per_seed],
            "mean_diff": mean, "t_low": low, "t_high": high,
            "a_mre": float(np.mean([r["first_mre"] for _, r in per_seed])),
            "b_mre": float(np.mean([r["second_mre"] for _, r in per_seed])),
            "verdict": verdict(low, high, a, b)}


def _table(rows: list[dict], first_col: str) -> list[str]:
    head = ["dataset", "N", first_col, "seeds", "MRE a / b (mm)", "mean a - b over seeds "
            "[95 % t interval]", "verdict", "per seed: a - b [bootstrap 95 %], Wilcoxon p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = "; ".join(f"s{s}: {x['mean_diff']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}], "
                          f"p={x['wilcoxon_p']:.2g}" for s, x in zip(r["seeds"], r["per_seed"]))
        interval = f"{r['mean_diff']:+.3f} [{r['t_low']:+.3f}, {r['t_high']:+.3f}]" \
            if math.isfinite(r["t_low"]) else f"{r['mean_diff']:+.3f}"
        lines.append(f"| {r['dataset']} | {r['budget']} | {r['label'] or '-'} | "
                     f"{len(r['seeds'])} | {r['a_mre']:.3f} / {r['b_mre']:.3f} | {interval} | "
                     f"{r['verdict']} | {seeds} |")
    return lines


def write_comparison(grid_dir: str | Path, a: str, b: str, dataset: Optional[str] = None,
                     out_dir: Optional[Path] = None) -> dict:
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir else grid_dir / "report"
    result = compare_grid(grid_dir, a, b, dataset)
    lines = [f"# {a} vs {b}: paired comparisons", "",
             "Per image: mean radial error over its landmarks (mm). Differences a - b: negative "
             "= a better. Within a seed, the same draw, training seed and test images; over "
             "seeds, the t interval of the per-seed mean differences (seeds - 1 degrees of "
             "freedom).", "", f"## {a} vs {b} at each budget and stage", ""]
    lines += _table(result["inits"], "stage")
    if result["refine"]:
        lines += ["", "## Refinement: final vs stage 1 (a = final, b = stage 1) per init", ""]
        lines += _table(result["refine"], "init")
    atomic_write_text(out_dir / f"compare_{a}_vs_{b}.md", "\n".join(lines) + "\n")
    header = ["kind", "dataset", "budget", "label", "a", "b", "seed", "images", "a_mre",
              "b_mre", "mean_diff", "ci_low", "ci_high", "wilcoxon_p"]
    rows = [[kind, r["dataset"], r["budget"], r["label"], r["a"], r["b"], s, x["images"],
             x["first_mre"], x["second_mre"], x["mean_diff"], x["ci_low"], x["ci_high"],
             x["wilcoxon_p"]]
            for kind in ("inits", "refine") for r in result[kind]
            for s, x in zip(r["seeds"], r["per_seed"])]
    atomic_write_text(out_dir / f"compare_{a}_vs_{b}.csv", csv_text(header, rows))
    return result
