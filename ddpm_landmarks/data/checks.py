"""What a run reads, checked before its first step: `check_run_inputs(cfg)`.

    report = check_run_inputs(cfg)        # DataError / ConfigError naming every problem
    print("\\n".join(report.lines()))

The entry scripts (pretrain, finetune, classify) call it right after Launch.from_env, on every
process and before anything is written into the run folder; `ddpm-landmarks data check CONFIG`
runs the same function and prints the report. The config may be any run config; what is checked
is what THAT run reads, told apart by its sections:
- fine-tuning (fewshot + model): data.train_split's few-shot draw (training and validation
  images, the run's own draw) and data.eval_split, the split it is scored on;
- pretraining (unlabeled, no fewshot): every image of the pools and labelled splits after the
  exclusions, and the landmark probe's split when probe.every > 0;
- classification (labels): every image of its label file;
- a dataset config (ExperimentConfig, `configs/<dataset>.yaml`): every split, and the pools.
Every image must decode; a labelled image's landmarks must lie within it and its spacing be
plausible (data/record_checks.py states the margin and the range); image names read from CSV
files must resolve inside the dataset folder (the readers refuse the others). With
data.on_bad_sample=error (the default) any problem refuses the run with a DataError listing
them; with skip, reading the data has already left those images out (data/registry.py,
pretrain_data.py, class_labels.py) and the report counts them.

Decoding runs on threads (record_checks.check_images): on 2 shared CPU cores the 300 ISBI 2015
images take ~0.7 s and the 1275 images of the chest pool ~1.5 s (README, Data).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.schema import from_dict
from ddpm_landmarks.data.record_checks import (
    LANDMARK_MARGIN,
    SPACING_RANGE_MM,
    check_images,
    default_threads,
    record_problems,
)
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import LandmarkDataset, Record
from ddpm_landmarks.data.splits import make_fewshot_split
from ddpm_landmarks.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_LISTED = 20                         # problems spelled out in one error / report


@dataclass
class _Group:
    """Images of one part of a run: labelled records (all checks) or bare image paths."""
    name: str
    dataset: str = ""
    records: Sequence[Record] = ()
    paths: Sequence[Path] = ()

    def __len__(self) -> int:
        return len(self.records) or len(self.paths)


@dataclass
class InputReport:
    run: str                            # "fine-tuning", "pretraining", ...
    on_bad_sample: str
    groups: list[tuple[str, int]]       # (what, number of images)
    images: int                         # distinct image files decoded
    labelled: bool                      # landmarks and spacing were checked too
    read_seconds: float                 # reading the dataset files, drawing the split
    check_seconds: float                # decoding every image and the record checks
    threads: int
    skipped: list[str] = field(default_factory=list)   # left out under on_bad_sample=skip

    def lines(self) -> list[str]:
        out = [f"{self.run} inputs (data.on_bad_sample={self.on_bad_sample}):"]
        out += [f"  {name}: {count} images" for name, count in self.groups]
        if self.skipped:
            out.append(f"  left out before the run (on_bad_sample=skip): {len(self.skipped)}")
            out += [f"    {message}" for message in self.skipped[:MAX_LISTED]]
        low, high = SPACING_RANGE_MM
        labelled = f"; landmarks within the image (+{LANDMARK_MARGIN:.0%} margin), spacing " \
            f"within {low}-{high} mm/px" if self.labelled else ""
        out.append(f"  all pass: {self.images} image files decode (checked in "
                   f"{self.check_seconds:.2f} s on {self.threads} thread(s), after "
                   f"{self.read_seconds:.2f} s reading the data){labelled}")
        return out


def run_kind(cfg) -> str:
    """Which run a config is for, from its sections (module doc)."""
    if hasattr(cfg, "labels"):
        return "classification"
    if hasattr(cfg, "unlabeled") and not hasattr(cfg, "fewshot"):
        return "pretraining"
    if hasattr(cfg, "fewshot") and hasattr(cfg, "model"):
        return "fine-tuning"
    return "dataset"


def _split(dataset: LandmarkDataset, key: str, name: str) -> LandmarkDataset:
    try:
        return dataset.split(name)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def _labelled(dataset: LandmarkDataset, name: str) -> _Group:
    return _Group(name, dataset.name, records=dataset.records)


def _finetune_groups(cfg) -> tuple[list[_Group], list[str]]:
    dataset = build_dataset(cfg.data)
    pool = _split(dataset, "data.train_split", cfg.data.train_split)
    try:
        split = make_fewshot_split(pool.ids, cfg.fewshot)
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    groups = [_labelled(pool.subset(split.train_ids),
                        f"{pool.name} training images ({split.policy.split(';')[0]})")]
    if split.val_ids:
        groups.append(_labelled(pool.subset(split.val_ids), f"{pool.name} validation images"))
    evaluation = _split(dataset, "data.eval_split", cfg.data.eval_split)
    groups.append(_labelled(evaluation, f"{evaluation.name} (data.eval_split)"))
    return groups, dataset.skipped


def _probe_data(cfg) -> DataConfig:
    """The landmark probe's data section (as training/probe.py reads it)."""
    if not cfg.probe.dataset:
        return cfg.data
    path = Path(cfg.probe.dataset)
    if not path.is_file():
        raise ConfigError(f"probe.dataset: config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), dict):
        raise ConfigError(f"probe.dataset: {path} has no 'data' section")
    return from_dict(DataConfig, loaded["data"], prefix=f"{path}: data")


def _pretrain_groups(cfg) -> tuple[list[_Group], list[str]]:
    from ddpm_landmarks.data.pretrain_data import build_pretrain_pools
    pools = build_pretrain_pools(cfg)
    groups = [_Group(f"pool {p.name}", paths=p.paths) for p in pools.pools]
    skipped = list(pools.report.unreadable)
    if cfg.probe.every:
        data = _probe_data(cfg)
        dataset = build_dataset(data)
        split = _split(dataset, "probe.split", cfg.probe.split or data.train_split)
        groups.append(_labelled(split, f"{split.name} (landmark probe)"))
        skipped += dataset.skipped
    return groups, skipped


def _classification_groups(cfg) -> tuple[list[_Group], list[str]]:
    from ddpm_landmarks.data.class_labels import load_label_task
    task = load_label_task(cfg.labels, cfg.data)
    for split in (cfg.data.train_split, cfg.labels.val_split):
        if split:
            task.split(split)           # DataError naming the label file when it is empty
    groups = [_Group(f"{task.name} split {split}",
                     paths=[i.path for i in task.images if i.split == split])
              for split in task.splits]
    return groups, task.skipped


def _dataset_groups(cfg) -> tuple[list[_Group], list[str]]:
    dataset = build_dataset(cfg.data)
    groups = [_Group(f"{dataset.name}:{split or '(no split)'}", dataset.name,
                     records=[r for r in dataset.records if r.split == split])
              for split in dataset.splits]
    skipped = list(dataset.skipped)
    if cfg.unlabeled.pools:
        from ddpm_landmarks.data.unlabeled import build_pools
        pools = build_pools(cfg.unlabeled)
        groups += [_Group(f"pool {p.name}", paths=p.paths) for p in pools.pools]
    return groups, skipped


GROUPS = {"fine-tuning": _finetune_groups, "pretraining": _pretrain_groups,
          "classification": _classification_groups, "dataset": _dataset_groups}


def _problems(groups: list[_Group], threads: int) -> list[str]:
    """Every problem of every group, one per image file (decodes are shared and cached)."""
    paths = [p for g in groups for p in g.paths]
    decoded = check_images(paths, threads)
    problems = {p: decoded[p].problem for p in paths if decoded[p].problem is not None}
    for g in groups:
        if g.records:
            found = record_problems(g.dataset, g.records, threads)
            for r in g.records:
                if r.id in found:
                    problems.setdefault(Path(r.image_path), found[r.id])
    return list(problems.values())


def check_run_inputs(cfg, threads: Optional[int] = None) -> InputReport:
    """Check what the run of `cfg` reads (module doc); the report of what was checked."""
    start = time.perf_counter()
    threads = threads or default_threads()
    kind = run_kind(cfg)
    groups, skipped = GROUPS[kind](cfg)
    read = time.perf_counter()
    problems = _problems(groups, threads)
    if problems:
        hint = "; data.on_bad_sample=skip leaves such images out" \
            if cfg.data.on_bad_sample == "error" else ""
        if len(problems) == 1:
            raise DataError(f"{problems[0]} (an image the {kind} run reads{hint})")
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED \
            else ""
        raise DataError(f"{len(problems)} images the {kind} run reads fail the start-up "
                        f"checks{hint}:\n  {listed}{more}")
    files = {str(r.image_path) for g in groups for r in g.records} | \
        {str(p) for g in groups for p in g.paths}
    report = InputReport(kind, cfg.data.on_bad_sample, [(g.name, len(g)) for g in groups],
                         len(files), any(g.records for g in groups), read - start,
                         time.perf_counter() - read, threads, list(skipped))
    log.info("start-up check: %d %s images decode and pass (%.2f s)%s", report.images, kind,
             report.check_seconds,
             f"; {len(skipped)} left out (on_bad_sample=skip)" if skipped else "")
    return report
