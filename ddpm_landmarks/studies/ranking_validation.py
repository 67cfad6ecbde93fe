"""Validation of a source ranking against fine-tuning: `rank-sources --validate GRID_DIR`.

Reads the cells of grid folders made by `ddpm-landmarks grid` (cells/*/cell.json, status done,
metrics.mre; experiments/report.load_cells) and matches each to a ranked candidate through its
resolved fine-tuning config (cells/<cell>/config.yaml):
  model.init pretrained / regressor -> the candidate whose folder is model.pretrained_path
                                       (resolved from the working directory, else from the
                                       folders above the grid: where the grid ran);
  model.init scratch                -> random:ddpm_unet:<model.preset> (arch ddpm_unet, no
                                       pretrained_path) or random:smp_encoder:<model.encoder>;
  imagenet and mean_shape cells have no candidate. Only cells of the target's dataset
(data.dataset) and label budget (fewshot.budget) count; several cells of one candidate (seeds,
gray adapters, ...) are averaged.

Reported, per grid folder (one fine-tuning protocol each: like with like) and pooled over all
of them (more candidates, mixed protocols): Spearman's rho between the candidates' scores and
their mean fine-tuned MRE (average ranks for ties), and whether the best-scored candidate had
the lowest MRE. SIGN CONVENTION: a higher score should mean a lower MRE, so a score
that orders candidates the way fine-tuning does gives rho = -1; rho = +1 is the reverse order.
Also reported: a seeded permutation p-value of rho, and the same rho for the FINAL ranking
(Spearman(-rank, MRE), same sign convention), where the anatomy / label-map filters put the
candidates that fail them last whatever their score: that is the order a user acts on.
With n candidates, |rho| < 1 is possible only for n >= 3, and a handful of candidates says
little: the number is always printed with n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.studies.source_ranking import RankResult
from ddpm_landmarks.studies.transferability import spearman
from ddpm_landmarks.utils.atomic import atomic_write_text


def _resolve(path: str, grid_dir: Path) -> Optional[Path]:
    candidate = Path(path)
    options = [candidate] if candidate.is_absolute() else \
        [Path.cwd() / candidate] + [parent / candidate for parent in grid_dir.resolve().parents]
    for option in options:
        if option.exists():
            return option.resolve()
    return None


def cell_key(config: dict, grid_dir: Path) -> tuple[Optional[str], str]:
    """(the candidate key of a cell's fine-tuning config, or None, and why not)."""
    model = config.get("model") or {}
    init, arch = model.get("init"), model.get("arch", "ddpm_unet")
    path = str(model.get("pretrained_path") or "")
    if init in ("pretrained", "regressor"):
        folder = _resolve(path, grid_dir) if path else None
        return (f"path:{folder}", "") if folder else (None, f"pretrained_path {path!r} not found")
    if init == "scratch":
        if arch == "ddpm_unet":
            if path:
                return None, "scratch with the architecture of an export"
            return f"random:ddpm_unet:{model.get('preset', 'tiny')}", ""
        return f"random:smp_encoder:{model.get('encoder', 'resnet18')}", ""
    return None, f"init {init!r} has no candidate"


@dataclass
class ValidationRow:
    candidate: str
    score: float
    rank: Optional[int]
    mre: float                   # mean over its cells
    unit: str
    cells: list[str] = field(default_factory=list)
    mres: list[float] = field(default_factory=list)


@dataclass
class Agreement:
    """How one set of candidates' scores agrees with their fine-tuned MRE."""
    rows: list[ValidationRow]    # sorted by MRE, best first
    rho: float                   # Spearman(score, MRE): -1 = the score's order is fine-tuning's
    n: int
    top1: Optional[bool]         # the best-scored candidate had the lowest MRE
    p: float                     # two-sided permutation p-value of rho (seeded)
    rho_rank: float              # Spearman(-rank, MRE): the final ranking, filters included
    n_ranked: int
    p_rank: float

    @staticmethod
    def of(rows: list[ValidationRow]) -> "Agreement":
        for row in rows:
            row.mre = float(np.mean(row.mres))
        rows = sorted(rows, key=lambda r: r.mre)
        usable = [r for r in rows if math.isfinite(r.score)]
        scores, mres = [r.score for r in usable], [r.mre for r in usable]
        rho = spearman(scores, mres)
        top1 = None
        if len(usable) >= 2:
            best = max(usable, key=lambda r: r.score)
            top1 = best.mre == min(r.mre for r in usable)
        ranked = [r for r in rows if r.rank is not None]
        order, ranked_mres = [-float(r.rank) for r in ranked], [r.mre for r in ranked]
        return Agreement(rows=rows, rho=rho, n=len(usable), top1=top1,
                         p=permutation_p(scores, mres), rho_rank=spearman(order, ranked_mres),
                         n_ranked=len(ranked), p_rank=permutation_p(order, ranked_mres))


def permutation_p(x: list[float], y: list[float], permutations: int = 10000,
                  seed: int = 0) -> float:
    """Two-sided p-value of Spearman's rho under random pairing (seeded, so a report is
    reproducible): the share of permutations of y with |rho| at least the observed |rho|."""
    rho = spearman(x, y)
    if not math.isfinite(rho):
        return float("nan")
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=float)
    hits = sum(abs(spearman(x, rng.permutation(y))) >= abs(rho) - 1e-12
               for _ in range(permutations))
    return (hits + 1) / (permutations + 1)


@dataclass
class Validation:
    grids: dict[str, Agreement]  # per grid folder: one fine-tuning protocol each
    pooled: Agreement            # every cell of every grid, averaged per candidate
    skipped: dict[str, int]
    budget: Optional[int]


def validate_ranking(result: RankResult, cfg: FinetuneConfig,
                     grid_dirs: list[str | Path]) -> Validation:
    """Per grid and pooled agreement of the ranking's scores with the grids' fine-tuned MRE.
    Grids may fine-tune differently (steps, batch, architecture): the per-grid values compare
    like with like; the pooled value adds candidates at the price of mixing protocols."""
    from ddpm_landmarks.experiments.report import load_cells
    by_key = {row.key: row for row in result.rows}
    per_grid: dict[str, dict[str, ValidationRow]] = {}
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for grid in map(Path, grid_dirs):
        try:
            cells = load_cells(grid)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--validate: {err}") from None
        found = per_grid.setdefault(grid.name, {})
        for cell in cells:
            mre = (cell.get("metrics") or {}).get("mre")
            if cell.get("status") != "done" or mre is None:
                skip("not done / no MRE")
                continue
            if cell.get("kind") == "mean_shape":
                skip("mean shape")
                continue
            folder = Path(cell["run_dir"]) if cell.get("run_dir") else \
                grid / "cells" / str(cell.get("name"))
            config_file = folder / "config.yaml"
            if not config_file.is_file():
                skip("no config.yaml")
                continue
            config = yaml.safe_load(config_file.read_text()) or {}
            data, fewshot = config.get("data") or {}, config.get("fewshot") or {}
            if data.get("dataset") != cfg.data.dataset:
                skip(f"other dataset ({data.get('dataset')})")
                continue
            if fewshot.get("budget") != cfg.fewshot.budget:
                skip(f"other budget (N={fewshot.get('budget')})")
                continue
            key, why = cell_key(config, grid)
            if key is None or key not in by_key:
                skip(why or "not among the candidates")
                continue
            row = by_key[key]
            entry = found.setdefault(key, ValidationRow(
                row.candidate, row.score, row.rank, math.nan,
                str(cell["metrics"].get("unit", ""))))
            entry.cells.append(f"{grid.name}/{cell.get('name')}")
            entry.mres.append(float(mre))
    pooled: dict[str, ValidationRow] = {}
    for found in per_grid.values():
        for key, entry in found.items():
            merged = pooled.setdefault(key, ValidationRow(entry.candidate, entry.score,
                                                          entry.rank, math.nan, entry.unit))
            merged.cells += entry.cells
            merged.mres += entry.mres
    return Validation(grids={name: Agreement.of(list(found.values()))
                             for name, found in per_grid.items()},
                      pooled=Agreement.of(list(pooled.values())), skipped=skipped,
                      budget=cfg.fewshot.budget)


def _rho_value(rho: float) -> str:
    return "n/a" if not math.isfinite(rho) else f"{rho:+.3f}"


def _rho(a: Agreement) -> str:
    return _rho_value(a.rho)


def validation_markdown(v: Validation, score_name: str) -> str:
    unit = v.pooled.rows[0].unit if v.pooled.rows else ""
    lines = [f"Validation against fine-tuning (label budget N={v.budget}): Spearman rho"
             f"({score_name}, fine-tuned MRE); -1 = the score orders the candidates exactly as "
             f"fine-tuning does (higher score should mean lower MRE), +1 = the reverse", ""]
    groups = list(v.grids.items()) + ([("pooled", v.pooled)] if len(v.grids) > 1 else [])
    for name, a in groups:
        top = "" if a.top1 is None else f"; best-scored candidate had the lowest MRE: " \
                                        f"{'yes' if a.top1 else 'no'}"
        p = "" if not math.isfinite(a.p) else f" (permutation p = {a.p:.3f})"
        final = f"; final ranking (filters first, then score): rho = " \
                f"{_rho_value(a.rho_rank)} over {a.n_ranked}" + \
                ("" if not math.isfinite(a.p_rank) else f" (p = {a.p_rank:.3f})")
        lines.append(f"- {name}: rho = {_rho(a)} over n = {a.n} candidates{p}{top}{final}")
    lines += ["", f"| candidate | rank | {score_name} | fine-tuned MRE ({unit}) | cells | "
                  f"MRE per cell |", "|---|---|---|---|---|---|"]
    for r in v.pooled.rows:
        per_cell = ", ".join(f"{cell} {m:.3f}" for cell, m in zip(r.cells, r.mres))
        lines.append(f"| {r.candidate} | {'-' if r.rank is None else r.rank} | "
                     f"{r.score:.4f} | {r.mre:.3f} | {len(r.cells)} | {per_cell} |")
    if v.skipped:
        lines += ["", "Cells not used: " + ", ".join(f"{k}: {n}" for k, n in
                                                    sorted(v.skipped.items()))]
    return "\n".join(lines) + "\n"


def write_validation(v: Validation, score_name: str, out_dir: str | Path) -> dict[str, Path]:
    from ddpm_landmarks.evaluation.metrics import csv_text
    out = Path(out_dir)
    rows = [[group, r.candidate, "" if r.rank is None else r.rank, r.score, r.mre, r.unit,
             len(r.cells), " ".join(r.cells), " ".join(f"{m:.6g}" for m in r.mres)]
            for group, a in list(v.grids.items()) + [("pooled", v.pooled)] for r in a.rows]
    csv = csv_text(["group", "candidate", "rank", "score", "mre", "unit", "n_cells", "cells",
                    "mres"], rows)
    return {"validation_md": atomic_write_text(out / "validation.md",
                                               validation_markdown(v, score_name)),
            "validation_csv": atomic_write_text(out / "validation.csv", csv)}
