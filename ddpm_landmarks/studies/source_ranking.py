"""`ddpm-landmarks rank-sources`: rank candidate pretrained checkpoints for a target landmark task
BEFORE fine-tuning, after Li et al., "Finding the most transferable tasks for brain image
segmentation" (2023): prior-knowledge filters first (modality / anatomy, then the region-of-
interest shape: SSIM of the label maps), then an analytical transferability estimate on frozen
features (studies/transferability.py: LogME adapted to heatmap regression, or H-score).

    result = rank_sources(cfg, RankConfig(), ["runs/pretrain/export", "random:ddpm_unet:small"])
    print(ranking_markdown(result)); write_ranking(result, out_dir)
    validation = validate_ranking(result, cfg, ["runs/grids/cpu-small"])   # ranking_validation.py

The target: the fine-tuning config's labelled images, i.e. the few-shot draw
(fewshot.budget / seed / draw, data/splits.make_fewshot_split) of data.train_split on the
model grid (data.image_size), with the config's heatmap targets (heatmap.sigma) and
foreground threshold (loss.foreground_threshold).

Filters and order (per candidate, source_candidates.py for what it was trained on):
  (a) anatomy match: yes (it saw the target's anatomy), no (only other, known anatomies),
      unknown, n/a (random init: no training data);
  (b) label-map SSIM (regressors only: the candidates trained with landmark labels; "n/a" for
      self-supervised and random ones): SSIM between the mean label maps (sum of the landmarks'
      Gaussians, averaged over the labelled images, scaled to a maximum of 1) of the source's
      labelled images and the target's, both on the target's model grid with the target's
      heatmap sigma. `rank.min_label_ssim` (default none: reported only) makes it a filter.
  Order: anatomy yes / n/a, then unknown, then no; within each, candidates passing the SSIM
  filter first; then by score, highest first. `rank.filtered=exclude` leaves the candidates
  that fail a filter (anatomy "no", SSIM below the threshold) unranked (rank "-") instead of
  last. Unknown anatomy is never a failure, only ranked after the known matches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from torch.utils.data import default_collate

from ddpm_landmarks.config.common import (
    AugmentConfig,
    DataConfig,
    FewShotConfig,
    HeatmapConfig,
)
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.ranges import check_ranges, ranged
from ddpm_landmarks.config.schema import apply_override, from_dict, to_dict
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.studies.source_candidates import (
    Candidate,
    anatomy_match,
    anatomy_text,
    dataset_anatomy,
    describe_sources,
    identify_candidate,
)
from ddpm_landmarks.studies.transferability import (
    feature_statistics,
    hscore,
    labelled_task,
    logme_score,
    mean_label_map,
    ssim,
)
from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

ANATOMY_TIER = {"yes": 0, "n/a": 0, "unknown": 1, "no": 2}
SCORE_NAMES = {"logme": "LogME", "hscore": "H-score"}


@dataclass
class RankConfig:
    score: Literal["logme", "hscore"] = "logme"
    # features and targets on g x g, g = min(this, image_size)
    feature_size: int = ranged(64, ">= 1")
    background_ratio: float = ranged(1.0, ">= 0")  # background pixels drawn per foreground pixel
    seed: int = ranged(0, ">= 0")       # of the background pixels and of random:... inits
    batch_size: int = ranged(16, ">= 1")  # feature-extraction batch
    hscore_shrinkage: float = ranged(0.1, "[0, 1]")  # score=hscore: covariance shrinkage towards I
    target_anatomy: str = ""            # "" = from data.dataset (source_candidates registry)
    # label-map filter; None = reported only
    min_label_ssim: Optional[float] = ranged(None, "[-1, 1]")
    filtered: Literal["last", "exclude"] = "last"
    device: str = "auto"                # auto = cuda when available


@dataclass
class _Settings:
    rank: RankConfig = field(default_factory=RankConfig)


def split_overrides(overrides: list[str]) -> tuple[RankConfig, list[str]]:
    """(RankConfig from the `rank.*` overrides, the others: the target config's)."""
    data: dict = {}
    rest = []
    for override in overrides:
        if override.split("=", 1)[0].strip().startswith("rank."):
            apply_override(data, _Settings, override)
        else:
            rest.append(override)
    return from_dict(_Settings, data).rank, rest


def _check(rank: RankConfig) -> None:
    """The declared ranges (config/ranges.py), also for a RankConfig built in code."""
    check_ranges(rank, "rank")


def labelled_batch(data: DataConfig, fewshot: FewShotConfig, heatmap: HeatmapConfig
                   ) -> tuple[dict, list[str], str]:
    """(collated HeatmapDataset items, ids, dataset name) of the few-shot training draw, on
    the model grid, without augmentation."""
    from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
    from ddpm_landmarks.data.registry import build_dataset
    from ddpm_landmarks.data.splits import dataset_fewshot_split
    try:
        split, pool, _ = dataset_fewshot_split(build_dataset(data), data.train_split, fewshot)
        ids = split.train_ids
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    items = HeatmapDataset(pool.subset(ids), data, AugmentConfig(flip_prob=0.0), heatmap,
                           train=False)
    return default_collate([items[i] for i in range(len(items))]), list(ids), pool.name


@dataclass
class RankRow:
    candidate: str
    kind: str
    detail: str
    anatomy: str
    match: str
    trained_on: str
    label_ssim: Optional[float]
    score: float
    notes: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    rank: Optional[int] = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    key: str = ""


@dataclass
class RankResult:
    target: str                      # e.g. "isbi2015:train, 50 images, 19 landmarks"
    target_anatomy: str
    score_name: str
    rows: list[RankRow]
    settings: dict                   # rank config, target config, candidates
    seconds: float


class _SourceMaps:
    """Mean label maps of the candidates' labelled sources, computed once per data draw."""

    def __init__(self, image_size: int, heatmap: HeatmapConfig):
        self.image_size, self.heatmap, self.cache = image_size, heatmap, {}

    def __call__(self, config: dict) -> torch.Tensor:
        key = yaml.safe_dump({"data": config.get("data"), "fewshot": config.get("fewshot")})
        if key not in self.cache:
            data = from_dict(DataConfig, config.get("data") or {}, prefix="data")
            data = dataclasses.replace(data, image_size=self.image_size)
            fewshot = from_dict(FewShotConfig, config.get("fewshot") or {}, prefix="fewshot")
            batch, _, _ = labelled_batch(data, fewshot, self.heatmap)
            self.cache[key] = mean_label_map(batch["heatmaps"], batch["mask"])
        return self.cache[key]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rank_sources(cfg: FinetuneConfig, rank: RankConfig, specs: list[str]) -> RankResult:
    """Score every candidate on the target task, apply the filters, order (module doc)."""
    _check(rank)
    t_start = time.perf_counter()
    if not specs:
        raise ConfigError("rank-sources needs at least one candidate (--candidates)")
    candidates: list[Candidate] = [identify_candidate(s) for s in specs]   # fail fast
    keys = [c.key for c in candidates]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a candidate is named twice: {', '.join(specs)}")
    device = _device(rank.device)
    batch, ids, name = labelled_batch(cfg.data, cfg.fewshot, cfg.heatmap)
    task = labelled_task(batch, ids, rank.feature_size, cfg.loss.foreground_threshold,
                         rank.background_ratio, rank.seed)
    target_map = mean_label_map(task.heatmaps, task.mask)
    target_anatomy = rank.target_anatomy or dataset_anatomy(cfg.data.dataset)
    source_maps = _SourceMaps(cfg.data.image_size, cfg.heatmap)
    log.info("target %s: %d images, %d landmarks, %d sampled pixels on a %d x %d grid",
             name, len(ids), task.num_landmarks, task.num_samples, task.grid, task.grid)
    rows = []
    for c in candidates:
        t0 = time.perf_counter()
        features = c.load(task.num_landmarks, cfg.data.image_size, rank.seed, device)
        total, partial = feature_statistics(features, task, rank.batch_size, device)
        del features                   # the model: one candidate in memory at a time
        details = (logme_score(total, partial, task) if rank.score == "logme"
                   else hscore(total, rank.hscore_shrinkage))
        notes, label = [], None
        if c.labelled_config is not None:
            try:
                label = ssim(source_maps(c.labelled_config), target_map)
            except (DataError, ConfigError, ValueError, FileNotFoundError) as err:
                notes.append(f"label-map SSIM n/a: source labels unavailable ({err})")
        match = anatomy_match(target_anatomy, c.sources)
        if match == "unknown":
            notes.append("anatomy unknown: ranked after the known matches")
        rows.append(RankRow(candidate=c.spec, kind=c.kind, detail=c.detail,
                            anatomy=anatomy_text(c.sources), match=match,
                            trained_on=describe_sources(c.sources), label_ssim=label,
                            score=float(details["score"]), notes=notes,
                            seconds=time.perf_counter() - t0, details=details, key=c.key))
        log.info("%s: %s %.4f (%.1f s)", c.spec, SCORE_NAMES[rank.score], rows[-1].score,
                 rows[-1].seconds)
    settings = {"rank": to_dict(rank), "target_config": to_dict(cfg), "candidates": specs,
                "target_ids": ids, "device": str(device)}
    return RankResult(target=f"{name}, {len(ids)} labelled images, {task.num_landmarks} "
                             f"landmarks, {task.num_samples} pixels on {task.grid}x{task.grid}",
                      target_anatomy=target_anatomy, score_name=SCORE_NAMES[rank.score],
                      rows=order_rows(rows, rank), settings=settings,
                      seconds=time.perf_counter() - t_start)


def order_rows(rows: list[RankRow], rank: RankConfig) -> list[RankRow]:
    """Filters first, then the score (module doc); sets each row's filters and rank."""
    def fails_ssim(row: RankRow) -> bool:
        return (rank.min_label_ssim is not None and row.label_ssim is not None
                and row.label_ssim < rank.min_label_ssim)

    for row in rows:
        row.filters = (["anatomy mismatch"] if row.match == "no" else []) + \
            ([f"label-map SSIM < {rank.min_label_ssim:g}"] if fails_ssim(row) else [])
    ordered = sorted(rows, key=lambda r: (ANATOMY_TIER[r.match], fails_ssim(r),
                                          -r.score if math.isfinite(r.score) else math.inf))
    position = 0
    for row in ordered:
        if rank.filtered == "exclude" and row.filters:
            row.rank = None
            continue
        position += 1
        row.rank = position
    return ordered


# ----------------------------------------------------------------------------------------------
# Tables and files
# ----------------------------------------------------------------------------------------------

CSV_HEADER = ["rank", "candidate", "kind", "detail", "anatomy", "match", "label_ssim", "score",
              "filters", "notes", "trained_on", "seconds"]


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cells(row: RankRow) -> list[str]:
    notes = [f"{'excluded' if row.rank is None else 'filtered'}: {f}" for f in row.filters]
    return ["-" if row.rank is None else str(row.rank), row.candidate,
            f"{row.kind} ({row.detail})", row.anatomy, row.match, _fmt(row.label_ssim, 3),
            _fmt(row.score), "; ".join(notes + row.notes)]


def ranking_markdown(result: RankResult) -> str:
    lines = [f"Source ranking for {result.target} (anatomy: {result.target_anatomy}); "
             f"score = {result.score_name} on frozen features, higher = more transferable",
             "",
             "| rank | candidate | kind | anatomy | match | label-map SSIM | "
             f"{result.score_name} | notes |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |"
              for r in result.rows]
    return "\n".join(lines) + "\n"


def ranking_csv(result: RankResult) -> str:
    """Full-precision values (metrics.csv_text); empty rank = excluded by a filter, empty SSIM
    = n/a, empty score = NaN."""
    from ddpm_landmarks.evaluation.metrics import csv_text
    rows = [["" if r.rank is None else r.rank, r.candidate, r.kind, r.detail, r.anatomy,
             r.match, "" if r.label_ssim is None else r.label_ssim, r.score,
             "; ".join(r.filters), "; ".join(r.notes), r.trained_on, f"{r.seconds:.2f}"]
            for r in result.rows]
    return csv_text(CSV_HEADER, rows)


def write_ranking(result: RankResult, out_dir: str | Path) -> dict[str, Path]:
    """ranking.md, ranking.csv, scores.json (per-landmark evidences, alpha, beta, timings) and
    config.yaml (what reproduces it), each written atomically."""
    out = Path(out_dir)
    scores = {"target": result.target, "target_anatomy": result.target_anatomy,
              "score": result.score_name, "seconds": result.seconds,
              "candidates": [dataclasses.asdict(r) for r in result.rows]}
    return {"ranking_md": atomic_write_text(out / "ranking.md", ranking_markdown(result)),
            "ranking_csv": atomic_write_text(out / "ranking.csv", ranking_csv(result)),
            "scores_json": atomic_write_text(out / "scores.json",
                                             json.dumps(scores, indent=2, default=str) + "\n"),
            "config": atomic_write_text(out / "config.yaml",
                                        yaml.safe_dump(result.settings, sort_keys=False))}
