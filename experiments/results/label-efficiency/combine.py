"""One report of the label-efficiency study from the reports of its partial runs.

The study's cells were run in parts, in different sessions (N = 10 and 50, then N = 5 and 25),
and the run folders of the first part are gone with its machine; each part's report
(`ddpm-landmarks report` / `compare`) is kept in its own folder. This script joins them:

    .venv/bin/python experiments/results/label-efficiency/combine.py

reads PART/cells.csv and PART/compare_ddpm_vs_scratch.csv of every PART below and writes,
into per-landmark-patches/ (the refinement of those parts: a patch per landmark), cells.csv,
summary.md / summary.csv, compare_ddpm_vs_scratch.csv and label_efficiency.png for all
budgets, with the same functions as `ddpm-landmarks report` (experiments/report.py). No number
is recomputed from images: each cell's metrics are those its part reported.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ddpm_landmarks.experiments.report import (
    plot_label_efficiency,
    refinement_markdown,
    summarize_groups,
    summary_markdown,
)
from ddpm_landmarks.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "per-landmark-patches"     # the study's first refinement: a patch per landmark
PARTS = ["N10-N50", "N5-N25"]
METRICS = ("mre", "sd", "median")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cell_of_row(row: dict) -> dict:
    """A cells.csv row back into the cell dict summarize_groups reads."""
    sdr = {key.split("@", 1)[1]: float(value) for key, value in row.items()
           if key.startswith("sdr@") and value != ""}
    metrics = {**{k: float(row[k]) for k in METRICS if row[k] != ""}, "unit": row["unit"],
               "sdr": sdr, "thresholds": [float(t) for t in sdr],
               "n": int(row["n"] or 0), "missed": int(row["missed"] or 0)}
    return {"dataset": row["dataset"], "init": row["init"], "stage": row["stage"],
            "budget": int(row["budget"]), "budget_label": row["budget"],
            "seed": int(row["seed"]), "status": row["status"],
            "train_images": int(row["train_images"]) if row["train_images"] else None,
            "metrics": metrics}


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main() -> None:
    rows, compare = [], []
    for part in PARTS:
        rows += read_csv(HERE / part / "cells.csv")
        compare += read_csv(HERE / part / "compare_ddpm_vs_scratch.csv")
    key = {"stage 1": 0, "final": 1}
    rows.sort(key=lambda r: (r["dataset"], r["init"], int(r["budget"]), key.get(r["stage"], 2),
                             int(r["seed"])))
    compare.sort(key=lambda r: (r["kind"], r["dataset"], int(r["budget"]), r["label"],
                                int(r["seed"])))
    cells = [cell_of_row(r) for r in rows]
    thresholds = sorted({t for c in cells for t in c["metrics"]["thresholds"]})
    groups = summarize_groups(cells, thresholds)
    atomic_write_text(OUT / "cells.csv", csv_text(rows))
    atomic_write_text(OUT / "compare_ddpm_vs_scratch.csv", csv_text(compare))
    atomic_write_text(OUT / "summary.csv", csv_text(groups))
    atomic_write_text(OUT / "summary.md",
                      summary_markdown(groups, thresholds, "label-efficiency (all parts)") +
                      refinement_markdown(groups, thresholds))
    plot_label_efficiency(groups, OUT / "label_efficiency.png")
    print(f"{len(rows)} cell rows from {', '.join(PARTS)} -> {OUT}")


if __name__ == "__main__":
    main()
