"""The shared jobs a grid's cells start from: pretrainings and supervised source fine-tunings.
Each is planned once per distinct resolved config and shared by every cell (all budgets, seeds
and datasets) whose init resolves to it; the runner (grid.py) runs it once, with a status file,
train.resume=latest and its failure recorded, before the first cell that needs it.

Pretraining (init kinds ddpm and the SSL methods): `<grid>/pretrain/<init>-<hash>/`,
status `pretraining.json`, done when export/ exists.

Source fine-tuning (init kind `supervised`; after Di Via et al., ISBI 2024, "Is in-domain data
beneficial in transfer learning for landmarks detection in x-ray images?": supervised landmark
pretraining on a labelled source dataset, then fine-tuning on the target): a fine-tuning run
(ddpm_landmarks.finetune) on the init's `source` config, `<grid>/sources/<init>-<hash>/`, status
`source.json`, done when its `source_weights` folder (best/ = the best validation MRE, or
export/ = the last step) exists. Its overrides, general to specific: the grid's
`finetune_overrides` (the common schedule and resolution), what its `source_init` gives a cell
of the same dataset (that init's kind overrides and `overrides`: e.g. ImageNet weights, or the
DDPM pretraining, or another source job: chains of any length), the init's `source_overrides`
(e.g. `fewshot.budget=null`: every source label), then its run folder, train.resume=latest and
the W&B group and tags. The cells then fine-tune its body with a new head (`model.init=
regressor`, models/transfer_init.py); their architecture is the source's.
Seeds vary the target draw and training, not the source model (as for pretrainings).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ddpm_landmarks.config.finetune import FinetuneConfig, check_same_body
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config, to_dict
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.experiments.grid_schema import DatasetSpec, GridConfig, InitSpec


@dataclass
class Pretraining:
    name: str                           # folder under <grid>/pretrain/
    method: str
    config_path: str
    overrides: list[str]                # complete: run folder, logger, resume included
    config: PretrainConfig              # resolved
    run_dir: Path
    users: list[str] = field(default_factory=list)   # cell (and source job) names

    status_file = "pretraining.json"
    module = "ddpm_landmarks.pretrain"
    label = "pretraining"

    @property
    def export_dir(self) -> Path:
        """The last step's export (what the job must have written to count as done)."""
        return self.run_dir / "export"

    @property
    def dependencies(self) -> list:
        return []

    def status_fields(self) -> dict:
        return {"method": self.method}

    def result(self) -> dict:
        return {}


@dataclass
class SourceJob:
    name: str                           # folder under <grid>/sources/
    init: str                           # the grid init that defines it
    config_path: str                    # the source's fine-tuning config
    overrides: list[str]                # complete: run folder, logger, resume included
    config: FinetuneConfig              # resolved
    run_dir: Path
    weights: str                        # "best" or "export": what the cells start from
    pretraining: Optional[Pretraining] = None       # what its own init pretrains first, or
    source: Optional["SourceJob"] = None            # the source job its own init starts from
    users: list[str] = field(default_factory=list)

    status_file = "source.json"
    module = "ddpm_landmarks.finetune"
    label = "source fine-tuning"

    @property
    def export_dir(self) -> Path:
        """The weights the cells start from (what the job must have written to count as done)."""
        return self.run_dir / self.weights

    @property
    def dependencies(self) -> list:
        return [job for job in (self.pretraining, self.source) if job is not None]

    def status_fields(self) -> dict:
        return {"init": self.init, "dataset": self.config.data.dataset, "weights": self.weights}

    def result(self) -> dict:
        """Its best validation MRE (in the source dataset's unit) and that step, from the run's
        metrics.jsonl (a line cut by a kill is skipped)."""
        best: dict = {}
        path = self.run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            mre = row.get("val/mre")
            if isinstance(mre, (int, float)) and (not best or mre < best["best_val_mre"]):
                best = {"best_val_mre": mre, "best_step": row.get("step")}
        return best


@dataclass
class SharedJobs:
    """The jobs planned so far, by config key (so equal configs give one job)."""
    pretrainings: dict[str, Pretraining] = field(default_factory=dict)
    sources: dict[str, SourceJob] = field(default_factory=dict)


def config_key(cfg) -> str:
    """Hash of a resolved config without its run folder, logger and resume setting: two jobs
    with the same key train the same model."""
    data = to_dict(cfg)
    for section in ("run", "logger"):
        data.pop(section, None)
    if not (data.get("curriculum") or {}).get("stages"):
        data.pop("curriculum", None)   # no curriculum: the key it had before the section existed
    if not (data.get("crops") or {}).get("grid"):
        data.pop("crops", None)        # whole images: likewise
    if not (data.get("refine") or {}).get("enabled"):
        data.pop("refine", None)       # one-stage fine-tuning: likewise
    if isinstance(data.get("refine"), dict) and not data["refine"].get("share_radius"):
        data["refine"].pop("share_radius", None)   # a patch per landmark: likewise
    if isinstance(data.get("model"), dict) and not data["model"].get("landmark_embedding"):
        data["model"].pop("landmark_embedding", None)
    data["train"] = {k: v for k, v in data["train"].items() if k != "resume"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def logger_overrides(grid: GridConfig, tags: list[str]) -> list[str]:
    lg = grid.logger
    return [f"logger.kind={lg.kind}", f"logger.project={lg.project}",
            f"logger.entity={lg.entity}", f"logger.wandb_mode={lg.wandb_mode}",
            f"logger.group={grid.name}", f"logger.tags={json.dumps(tags)}"]


def _run_overrides(grid: GridConfig, run_dir: Path, tags: list[str]) -> list[str]:
    return [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
            "train.resume=latest"] + logger_overrides(grid, tags)


def default_pretrain_config(kind: str, dataset: str) -> str:
    return f"configs/pretrain/{dataset}.yaml" if kind == "ddpm" else \
        f"configs/pretrain/{kind}_{dataset}.yaml"


def plan_pretraining(grid: GridConfig, init: str, spec: InitSpec, kind: str, dataset: str,
                     ds: DatasetSpec, jobs: SharedJobs) -> Pretraining:
    path = spec.pretrain or default_pretrain_config(kind, dataset)
    base = grid.pretrain_overrides + ds.pretrain_overrides + spec.pretrain_overrides + \
        [f"method={kind}"]
    return _pretraining_job(grid, init, kind, path, base, jobs, init,
                            f"pretraining of init {init!r} for dataset {dataset!r}")


def plan_refine_pretraining(grid: GridConfig, init: str, spec: InitSpec,
                            jobs: SharedJobs) -> Pretraining:
    """The DDPM pretraining of a ddpm init's local network (the refinement stage, on crops):
    spec.refine_pretrain with the grid's refine.pretrain_overrides, then the init's
    refine_pretrain_overrides; folder pretrain/<init>-refine-<hash>."""
    base = grid.refine.pretrain_overrides + spec.refine_pretrain_overrides + ["method=ddpm"]
    return _pretraining_job(grid, init, "ddpm", spec.refine_pretrain, base, jobs,
                            f"{init}-refine", f"refinement pretraining of init {init!r}")


def _pretraining_job(grid: GridConfig, init: str, kind: str, path: str, base: list[str],
                     jobs: SharedJobs, folder: str, what: str) -> Pretraining:
    try:
        cfg = load_config(path, base, cls=PretrainConfig)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    key = config_key(cfg)
    if key in jobs.pretrainings:
        return jobs.pretrainings[key]
    run_dir = grid.grid_dir / "pretrain" / f"{folder}-{key}"
    overrides = base + _run_overrides(grid, run_dir,
                                      ["pretrain", f"init:{init}", f"method:{kind}"])
    job = Pretraining(run_dir.name, kind, path, overrides,
                      load_config(path, overrides, cls=PretrainConfig), run_dir)
    jobs.pretrainings[key] = job
    return job


def plan_source(grid: GridConfig, init: str, spec: InitSpec, base_overrides: list[str],
                pretraining: Optional[Pretraining], source: Optional[SourceJob],
                jobs: SharedJobs) -> SourceJob:
    """The source fine-tuning of a `supervised` init; `base_overrides`, `pretraining` and
    `source` are what its source_init resolves to (nothing without one)."""
    base = grid.finetune_overrides + base_overrides + spec.source_overrides
    where = f"source of init {init!r} ({spec.source})"
    try:
        cfg = load_config(spec.source, base, cls=FinetuneConfig)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if spec.source_weights == "best" and (not cfg.train.eval_every or
                                          cfg.fewshot.val_policy == "none"):
        raise ConfigError(f"{where}: source_weights=best needs validation in the source run "
                          f"(train.eval_every > 0 and a fewshot.val_policy other than none); "
                          f"or set inits.{init}.source_weights=export")
    key = config_key(cfg) + ("" if spec.source_weights == "best" else "-export")
    if key in jobs.sources:
        return jobs.sources[key]
    run_dir = grid.grid_dir / "sources" / f"{init}-{key}"
    overrides = base + _run_overrides(grid, run_dir, ["source", f"init:{init}",
                                                      f"dataset:{cfg.data.dataset}"])
    job = SourceJob(run_dir.name, init, spec.source, overrides,
                    load_config(spec.source, overrides, cls=FinetuneConfig), run_dir,
                    spec.source_weights, pretraining, source)
    for dependency in job.dependencies:
        dependency.users.append(f"source:{job.name}")
    jobs.sources[key] = job
    return job


def check_cell_source(cell_name: str, cfg: FinetuneConfig, eval_split: str,
                      source: SourceJob) -> None:
    """A cell fine-tunes the source's architecture, and is never scored on images its source
    was trained on."""
    if cfg.model.init != "regressor" or cfg.model.pretrained_path != str(source.export_dir):
        raise ConfigError(f"cell {cell_name}: a supervised init fine-tunes its source's model "
                          f"(model.init=regressor, model.pretrained_path={source.export_dir}); "
                          f"its overrides set model.init={cfg.model.init}, "
                          f"model.pretrained_path={cfg.model.pretrained_path}")
    try:
        check_same_body(cfg.model, source.config.model, f"of source job {source.name}")
    except ValueError as err:
        raise ConfigError(f"cell {cell_name}: {err}") from None
    src = source.config.data
    if (src.dataset, src.root, src.train_split) == (cfg.data.dataset, cfg.data.root, eval_split):
        raise ConfigError(f"cell {cell_name}: its source {source.name} trains on "
                          f"{src.dataset}:{src.train_split}, the split the cell is scored on")
