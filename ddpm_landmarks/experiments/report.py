"""Result tables and figures of a grid: `ddpm-landmarks report RUNS_DIR`.

Reads every cells/*/cell.json of a grid folder (written by experiments/grid.py) and writes into
RUNS_DIR/report/ (atomically, so a reader never sees half a table):

    cells.csv              one row per cell (every seed): status, MRE, SD, median, SDR, misses,
                           wall time, or the error of a failed cell
    summary.csv / .md      one row per dataset x init x budget: mean and spread (sample SD,
                           ddof=1) over the seeds of MRE and of each SDR; SD is the mean of the
                           runs' own SD over image-landmark pairs; summary.md then lists the
                           grid's source fine-tunings (status, best validation MRE on the
                           source, wall time, or the error), when it has any
    label_efficiency.png   error against the number of labelled images (log x axis), one line
                           per initialisation, error bars = SD over seeds, one panel per dataset
    per_landmark_<dataset>_N<budget>.png
                           MRE per landmark, one bar per initialisation (mean over seeds)

A grid with a refinement stage has two rows per cell and group, stage "stage 1" and "final"
(lines and bars per init and stage), and summary.md adds a side-by-side table of the two.

With W&B (`--wandb`, default when the grid logs to W&B) the same tables and figures go to a
summary run `<grid>-report` in the grid's group (offline without an API key).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from ddpm_landmarks.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def load_cells(grid_dir: Path, order: Optional[dict] = None,
               current: Optional[set[str]] = None) -> list[dict]:
    """Every cell.json under grid_dir/cells (only the folders in `current` when given: the
    plan's cells, not those of an earlier version of the experiment file), sorted by dataset,
    init, budget, seed; datasets and inits in the experiment file's order when `order`
    ({"datasets": [...], "inits": [...]}) is given, else alphabetically."""
    cells_dir = Path(grid_dir) / "cells"
    if not cells_dir.is_dir():
        raise FileNotFoundError(f"{grid_dir} is not a grid folder (no cells/ inside); run "
                                f"`ddpm-landmarks grid EXPERIMENT.yaml` first")
    cells = []
    for path in sorted(cells_dir.glob("*/cell.json")):
        if current is not None and path.parent.name not in current:
            continue
        try:
            cells.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None

    rank = {key: {name: i for i, name in enumerate((order or {}).get(key, []))}
            for key in ("datasets", "inits")}

    def sort_key(c: dict):
        budget = c.get("budget")
        return (rank["datasets"].get(c["dataset"], math.inf), c["dataset"],
                rank["inits"].get(c["init"], math.inf), c["init"],
                math.inf if budget is None else budget, c["seed"])
    return sorted(cells, key=sort_key)


STAGE1, FINAL = "stage 1", "final"


def expand_stages(cells: list[dict]) -> list[dict]:
    """Cells with a refinement stage become two rows, stage "stage 1" (its stage1_metrics,
    scored in eval_dir/stage1) and "final"; one-stage cells get stage ""."""
    out = []
    for c in cells:
        if c.get("stage1_metrics") is None:
            out.append({**c, "stage": ""})
            continue
        eval_dir = c.get("eval_dir")
        out.append({**c, "stage": STAGE1, "metrics": c["stage1_metrics"],
                    "eval_dir": str(Path(eval_dir) / "stage1") if eval_dir else None})
        out.append({**c, "stage": FINAL})
    return out


def _label(row: dict) -> str:
    return row["init"] + (f" ({row['stage']})" if row.get("stage") else "")


def _num(value) -> float:
    """A metric as a float; metrics.json stores NaN (e.g. the MRE when all were missed) as null."""
    return math.nan if value is None or value == "" else float(value)


def _thresholds(cells: list[dict]) -> list[float]:
    found = sorted({float(t) for c in cells for t in c.get("metrics", {}).get("thresholds", [])})
    return found


def _sdr(cell: dict, t: float) -> float:
    sdr = cell.get("metrics", {}).get("sdr", {})
    for key, value in sdr.items():
        if math.isclose(float(key), t):
            return _num(value)
    return math.nan


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def cell_rows(cells: list[dict], thresholds: list[float]) -> tuple[list[str], list[list]]:
    header = ["dataset", "init", "stage", "budget", "seed", "config_hash", "status",
              "train_images", "unit", "mre", "sd", "median"] + [f"sdr@{t:g}" for t in thresholds] + \
             ["n", "missed", "wall_s", "error"]
    rows = []
    for c in cells:
        m = c.get("metrics", {})
        rows.append([c["dataset"], c["init"], c.get("stage", ""),
                     c.get("budget_label", c.get("budget")), c["seed"],
                     c.get("config_hash", ""), c.get("status", "?"), c.get("train_images", ""), m.get("unit", ""),
                     m.get("mre", ""), m.get("sd", ""), m.get("median", "")] +
                    [_sdr(c, t) if m else "" for t in thresholds] +
                    [m.get("n", ""), m.get("missed", ""),
                     round(c["wall_s"], 1) if "wall_s" in c else "", c.get("error", "")])
    return header, rows


def summarize_groups(cells: list[dict], thresholds: list[float]) -> list[dict]:
    """One dict per (dataset, init, budget, stage) in cell order: seeds done / total, means,
    SDs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["dataset"], c["init"], c.get("budget_label", str(c.get("budget"))),
                c.get("stage", ""))].append(c)
    out = []
    for (dataset, init, budget, stage), members in groups.items():
        done = [c for c in members if c.get("status") == "done"]
        mre, mre_sd = _mean_sd([_num(c["metrics"]["mre"]) for c in done])
        row = {"dataset": dataset, "init": init, "stage": stage, "budget": budget,
               "train_images": done[0].get("train_images") if done else None,
               "seeds_done": len(done), "seeds": len(members),
               "failed": sum(c.get("status") == "failed" for c in members),
               "unit": done[0]["metrics"].get("unit", "") if done else "",
               "mre": mre, "mre_sd_over_seeds": mre_sd,
               "sd": _mean_sd([_num(c["metrics"]["sd"]) for c in done])[0],
               "median": _mean_sd([_num(c["metrics"]["median"]) for c in done])[0],
               "missed": sum(int(c["metrics"].get("missed", 0)) for c in done)}
        for t in thresholds:
            row[f"sdr@{t:g}"], row[f"sdr@{t:g}_sd_over_seeds"] = _mean_sd(
                [_sdr(c, t) for c in done])
        out.append(row)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(mean: float, sd: float, digits: int = 2, suffix: str = "") -> str:
    if not np.isfinite(mean):
        return "-"
    text = f"{mean:.{digits}f}{suffix}"
    return text + (f" ± {sd:.{digits}f}" if np.isfinite(sd) else "")


def summary_markdown(groups: list[dict], thresholds: list[float], title: str) -> str:
    head = ["dataset", "init", "N", "seeds", "MRE ± SD over seeds", "SD (pairs)", "median"] + \
           [f"SDR {t:g}" for t in thresholds] + ["missed"]
    lines = [f"# {title}", "",
             "MRE, SD and median in each dataset's unit (mm where the spacing is known); SDR in "
             "% of landmarks within the radius; ± = sample SD over seeds (ddof 1).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = g["budget"] + (f" ({g['train_images']})" if g["budget"] == "all" and
                           g["train_images"] else "")
        seeds = f"{g['seeds_done']}/{g['seeds']}" + (f", {g['failed']} failed" if g["failed"]
                                                     else "")
        unit = f" {g['unit']}" if g["unit"] else ""
        cells = [g["dataset"], _label(g), n, seeds, _pm(g["mre"], g["mre_sd_over_seeds"]) + unit,
                 _fmt(g["sd"], 2), _fmt(g["median"], 2)] + \
                [_pm(g[f"sdr@{t:g}"], g[f"sdr@{t:g}_sd_over_seeds"], 1) for t in thresholds] + \
                [str(g["missed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def refinement_markdown(groups: list[dict], thresholds: list[float]) -> str:
    """Stage 1 and final side by side per dataset, init and budget ("" without refinement)."""
    pairs: dict[tuple, dict] = defaultdict(dict)
    for g in groups:
        if g.get("stage"):
            pairs[(g["dataset"], g["init"], g["budget"])][g["stage"]] = g
    if not pairs:
        return ""
    t = thresholds[0] if thresholds else None
    head = ["dataset", "init", "N", "seeds", "stage-1 MRE", "final MRE"] + (
        [f"stage-1 SDR {t:g}", f"final SDR {t:g}"] if t is not None else [])
    lines = ["", "## Refinement: stage 1 and final", "",
             "Mean ± sample SD over seeds; both stages scored on the same images.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, init, budget), stages in pairs.items():
        a, b = stages.get(STAGE1), stages.get(FINAL)
        if a is None or b is None:
            continue
        row = [dataset, init, budget, f"{b['seeds_done']}/{b['seeds']}",
               _pm(a["mre"], a["mre_sd_over_seeds"]), _pm(b["mre"], b["mre_sd_over_seeds"])]
        if t is not None:
            row += [_pm(a[f"sdr@{t:g}"], a[f"sdr@{t:g}_sd_over_seeds"], 1),
                    _pm(b[f"sdr@{t:g}"], b[f"sdr@{t:g}_sd_over_seeds"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def sources_markdown(grid_dir: Path) -> str:
    """The source fine-tunings of a supervised init (sources/*/source.json), "" when none."""
    jobs = [json.loads(p.read_text()) for p in sorted(Path(grid_dir).glob("sources/*/source.json"))]
    if not jobs:
        return ""
    lines = ["", "## Source fine-tunings", "",
             "Supervised landmark pretraining on the source dataset; the cells of its init "
             "fine-tune its weights. Validation MRE in the source dataset's unit.", "",
             "| source job | init | dataset | weights | status | best val MRE (step) | wall "
             "| error |", "|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        best = (f"{job['best_val_mre']:.2f} ({job.get('best_step')})"
                if isinstance(job.get("best_val_mre"), (int, float)) else "-")
        wall = f"{job['wall_s'] / 60:.1f} min" if "wall_s" in job else "-"
        error = " ".join(str(job.get("error", "")).replace("|", "/").split())
        lines.append(f"| {job.get('name')} | {job.get('init')} | {job.get('dataset')} | "
                     f"{job.get('weights')} | {job.get('status')} | {best} | {wall} | {error} |")
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_label_efficiency(groups: list[dict], path: Path) -> Optional[Path]:
    """MRE against labelled images, log x, one line per init, error bars over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [g for g in groups if np.isfinite(g["mre"]) and g["train_images"]]
    if not done:
        return None
    datasets = sorted({g["dataset"] for g in done})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [g for g in done if g["dataset"] == dataset]
        for label in dict.fromkeys(_label(g) for g in rows):
            line = sorted((g for g in rows if _label(g) == label),
                          key=lambda g: g["train_images"])
            x = [g["train_images"] for g in line]
            y = [g["mre"] for g in line]
            err = [g["mre_sd_over_seeds"] if np.isfinite(g["mre_sd_over_seeds"]) else 0.0
                   for g in line]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label,
                        linestyle="--" if line[0].get("stage") == STAGE1 else "-")
        ax.set_xscale("log")
        budgets = sorted({g["train_images"] for g in rows})
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(f"MRE ({rows[0]['unit']})")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _per_landmark_mre(grid_dir: Path, cell: dict) -> Optional[np.ndarray]:
    if cell.get("eval_dir"):
        path = Path(cell["eval_dir"]) / "per_landmark.csv"
    else:
        folder = Path(cell["run_dir"]) if cell.get("run_dir") else \
            grid_dir / "cells" / cell["name"]
        path = folder / f"eval_{cell.get('eval_split', 'test1')}" / "per_landmark.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return np.array([float(row["mre"]) if row["mre"] not in ("", "nan") else np.nan
                         for row in csv.DictReader(fh)])


def plot_per_landmark(grid_dir: Path, cells: list[dict], out_dir: Path) -> list[Path]:
    """One figure per dataset and budget: MRE per landmark, bars per init, SD over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key: dict[tuple, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    units = {}
    for c in cells:
        if c.get("status") != "done":
            continue
        values = _per_landmark_mre(grid_dir, c)
        if values is not None:
            key = (c["dataset"], c.get("budget_label", str(c.get("budget"))))
            by_key[key][_label(c)].append(values)
            units[key] = c["metrics"].get("unit", "")
    written = []
    for (dataset, budget), inits in by_key.items():
        k = max(len(v[0]) for v in inits.values())
        width = 0.8 / len(inits)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * k * max(1, len(inits) / 2)), 4.0))
        for j, (init, runs) in enumerate(inits.items()):
            stack = np.stack(runs)
            mean = np.nanmean(stack, axis=0)
            sd = np.nanstd(stack, axis=0, ddof=1) if len(runs) > 1 else None
            ax.bar(np.arange(k) + (j - (len(inits) - 1) / 2) * width, mean, width, yerr=sd,
                   capsize=2, label=init)
        ax.set_xticks(np.arange(k))
        ax.set_xticklabels([str(i) for i in range(k)])
        ax.set_xlabel("landmark (0-based index)")
        ax.set_ylabel(f"MRE ({units[(dataset, budget)]})")
        ax.set_title(f"{dataset}, N = {budget}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save_figure(fig, out_dir / f"per_landmark_{dataset}_N{budget}.png"))
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def write_report(grid_dir: str | Path, out_dir: Optional[str | Path] = None,
                 wandb: bool = False) -> dict:
    """Tables and figures of a grid folder; returns {"cells", "groups", "files"}."""
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir else grid_dir / "report"
    plan = json.loads((grid_dir / "grid.json").read_text()) if (grid_dir / "grid.json").is_file() \
        else {}
    grid = plan.get("grid", {})
    current = {Path(c["run_dir"]).name for c in plan.get("cells", []) if c.get("run_dir")}
    cells = expand_stages(load_cells(grid_dir, {"datasets": list(grid.get("datasets", {})),
                                                "inits": list(grid.get("inits", {}))},
                                     current or None))
    thresholds = _thresholds(cells)
    title = plan.get("grid", {}).get("name", grid_dir.name)

    header, rows = cell_rows(cells, thresholds)
    groups = summarize_groups(cells, thresholds)
    files = {"cells_csv": atomic_write_text(out_dir / "cells.csv", _csv_text(header, rows))}
    group_header = list(groups[0].keys()) if groups else ["dataset", "init", "budget"]
    files["summary_csv"] = atomic_write_text(
        out_dir / "summary.csv", _csv_text(group_header, [[g[h] for h in group_header]
                                                          for g in groups]))
    files["summary_md"] = atomic_write_text(out_dir / "summary.md",
                                            summary_markdown(groups, thresholds, title) +
                                            refinement_markdown(groups, thresholds) +
                                            sources_markdown(grid_dir))
    figures = []
    plot = plot_label_efficiency(groups, out_dir / "label_efficiency.png")
    if plot is not None:
        figures.append(plot)
    figures += plot_per_landmark(grid_dir, cells, out_dir)
    files["figures"] = figures
    if wandb:
        from ddpm_landmarks.experiments.wandb_report import log_report
        files["wandb_dir"] = log_report(plan.get("grid", {}), title, out_dir, figures)
    return {"cells": cells, "groups": groups, "files": files}
