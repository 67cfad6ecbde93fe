"""An experiment grid: dataset x initialisation x label budget x seed, and its expansion into
shared jobs (pretrainings, source fine-tunings: grid_jobs.py) and fine-tuning cells.

    grid = load_grid("experiments/cpu-small.yaml", overrides=["seeds=[0]"])
    plan = build_plan(grid)     # plan.pretrainings, plan.sources (shared), plan.cells (one run each)

Experiment file (every key is checked, as in run configs):

    name: cpu-small
    output_dir: runs/grids                  # the grid lives in runs/grids/cpu-small/
    budgets: [50]                           # labelled images; null = the whole training split
    seeds: [0, 1]                           # seed s: fewshot.draw=s and train.seed=s
    eval_split: test1
    finetune_overrides: [train.max_steps=600]      # every fine-tuning run
    pretrain_overrides: [train.max_steps=1000]     # every pretraining run
    datasets:
      isbi2015:
        finetune: configs/finetune/isbi2015.yaml
        overrides: [data.image_size=128]           # its fine-tuning runs
        pretrain_overrides: [data.image_size=128]  # the pretrainings its cells use
    inits:
      ddpm:      {pretrain: configs/pretrain/isbi2015.yaml, pretrain_overrides: [model.preset=small]}
      simclr:    {}                                # kind = the name; configs/pretrain/simclr_<dataset>.yaml
      scratch:   {overrides: [model.preset=small]}
      imagenet:  {overrides: [model.encoder=resnet50]}
      chest_ddpm: {kind: checkpoint, checkpoint: runs/pretrain_chest/export}
      mean_shape: {}
      spine_unet:                           # landmarks of another dataset first (grid_jobs.py)
        kind: supervised
        source: configs/finetune/aasce_spine.yaml
        source_init: imagenet               # ImageNet -> spine -> each dataset
        source_overrides: [fewshot.budget=null]

Init kinds (INIT_KINDS): `ddpm` and the SSL methods (`simclr`, `moco_v2`, `moco_v3`) pretrain
first (one run per distinct resolved pretraining config, shared by every cell that needs it:
all budgets and seeds, and every dataset whose pretraining config resolves to the same);
`imagenet`, `scratch` and `checkpoint` (an existing DDPM or SSL export, or a saved fine-tuned
regressor, whose body the cells fine-tune with a new head; the path may be a glob such as
`runs/grids/cpu-small/pretrain/ddpm-*/export` that must match exactly one folder) do not; `mean_shape`
is the trivial predictor (mean training landmark positions, no network); `supervised` fine-tunes
a source job's model (a fine-tuning on another labelled dataset, shared like a pretraining and
itself initialised by `source_init`, another init of the grid: chains; grid_jobs.py) with a new
head, in the source's architecture. The overrides of a fine-tuning cell are applied in this
order, the more specific later and winning: the grid's `finetune_overrides`, the dataset's, the
init kind's own (KIND_OVERRIDES: architecture, init, weights path), the init's `overrides`,
then the cell's (budget, seed, run folder, W&B group and tags). Pretraining: the grid's, the
dataset's, then the init's `pretrain_overrides`. Source fine-tuning: grid_jobs.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ddpm_landmarks.config import ConfigError, load_config, to_dict
from ddpm_landmarks.experiments.grid_jobs import (Pretraining, SharedJobs, SourceJob,
                                                  check_cell_source, logger_overrides,
                                                  plan_pretraining, plan_source)
from ddpm_landmarks.models.regressor_init import BODY_FIELDS
from ddpm_landmarks.training.config import PretrainConfig
from ddpm_landmarks.training.finetune_config import FinetuneConfig

log = logging.getLogger(__name__)

PRETRAINED_KINDS = ("ddpm", "simclr", "moco_v2", "moco_v3")
# mean_shape: no network, the average training landmark positions (the trivial reference row).
INIT_KINDS = PRETRAINED_KINDS + ("imagenet", "scratch", "checkpoint", "mean_shape", "supervised")
SOURCE_FIELDS = ("source", "source_init", "source_overrides")

# Fine-tuning overrides of each init kind ({export} = the pretraining's, checkpoint's or source
# job's weights folder; SSL kinds also get model.encoder and model.gray_adapter from the
# pretraining config, supervised the source's architecture: _kind_overrides).
KIND_OVERRIDES: dict[str, list[str]] = {
    "ddpm": ["model.arch=ddpm_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "simclr": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "moco_v2": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "moco_v3": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "imagenet": ["model.arch=smp_unet", "model.init=imagenet"],
    "scratch": ["model.init=scratch", "model.pretrained_path="],
    "checkpoint": ["model.init=pretrained", "model.pretrained_path={export}"],
    "mean_shape": [],
    "supervised": ["model.init=regressor", "model.pretrained_path={export}"],
}


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

@dataclass
class DatasetSpec:
    finetune: str = ""                  # fine-tuning config; "" = configs/finetune/<name>.yaml
    eval_split: str = ""                # split the cells are scored on; "" = the grid's eval_split
    overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)


@dataclass
class InitSpec:
    kind: str = ""                      # one of INIT_KINDS; "" = the init's name
    # Pretraining config of ddpm / SSL kinds; "" = configs/pretrain/<dataset>.yaml (ddpm) or
    # configs/pretrain/<kind>_<dataset>.yaml (SSL).
    pretrain: str = ""
    pretrain_overrides: list[str] = field(default_factory=list)
    checkpoint: str = ""                # kind=checkpoint: DDPM / SSL export or saved regressor
                                        # folder; a glob must match exactly one
    # Which weights of the pretraining the cells fine-tune: its last step ("export") or the step
    # with the best landmark probe ("best": needs probe.every > 0 in the pretraining config).
    pretrain_weights: Literal["export", "best"] = "export"
    overrides: list[str] = field(default_factory=list)
    # kind=supervised: the source's fine-tuning config, the init its model starts from (another
    # entry of `inits`; "" = the source config and source_overrides decide, e.g.
    # [model.arch=smp_unet, model.init=imagenet]), its overrides, and which of its weights the
    # cells fine-tune: the best validation MRE ("best") or the last step ("export").
    source: str = ""
    source_init: str = ""
    source_overrides: list[str] = field(default_factory=list)
    source_weights: Literal["best", "export"] = "best"


@dataclass
class LauncherConfig:
    # inline: in this process (tests, debugging); process: one Python process per job;
    # accelerate: `accelerate launch --num_processes N [accelerate_args] -m ...` per job.
    kind: Literal["inline", "process", "accelerate"] = "process"
    num_processes: int = 1
    accelerate_args: list[str] = field(default_factory=list)   # e.g. [--multi_gpu, --mixed_precision=bf16]


@dataclass
class GridLoggerConfig:
    kind: Literal["wandb", "tensorboard", "none"] = "wandb"   # every run of the grid
    project: str = "ddpm-landmarks"
    entity: str = ""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class GridConfig:
    name: str = "grid"
    output_dir: str = "runs/grids"
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    inits: dict[str, InitSpec] = field(default_factory=dict)
    budgets: list[Optional[int]] = field(default_factory=lambda: [50])
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_split: str = "test1"
    finetune_overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: GridLoggerConfig = field(default_factory=GridLoggerConfig)

    @property
    def grid_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_grid(path: str | Path, overrides: Optional[list[str]] = None) -> GridConfig:
    grid = load_config(path, overrides, cls=GridConfig)
    if not grid.datasets:
        raise ConfigError(f"{path}: 'datasets' is empty: name at least one dataset")
    if not grid.inits:
        raise ConfigError(f"{path}: 'inits' is empty: name at least one initialisation")
    if not grid.budgets or not grid.seeds:
        raise ConfigError(f"{path}: 'budgets' and 'seeds' need at least one value each")
    for budget in grid.budgets:
        if budget is not None and budget < 1:
            raise ConfigError(f"budgets: {budget} is not a positive number of images (or null)")
    if len(set(grid.budgets)) != len(grid.budgets) or len(set(grid.seeds)) != len(grid.seeds):
        raise ConfigError(f"budgets {grid.budgets} / seeds {grid.seeds} repeat a value")
    for name, spec in grid.inits.items():
        kind = spec.kind or name
        if kind not in INIT_KINDS:
            raise ConfigError(f"inits.{name}: unknown kind {kind!r}; valid kinds: "
                              f"{', '.join(INIT_KINDS)} (set inits.{name}.kind)")
        if kind == "checkpoint" and not spec.checkpoint:
            raise ConfigError(f"inits.{name}: kind checkpoint needs inits.{name}.checkpoint "
                              f"(an export folder)")
        if kind == "supervised" and not spec.source:
            raise ConfigError(f"inits.{name}: kind supervised needs inits.{name}.source (the "
                              f"source dataset's fine-tuning config)")
        if kind != "supervised" and any(getattr(spec, f) for f in SOURCE_FIELDS):
            raise ConfigError(f"inits.{name}: {', '.join(SOURCE_FIELDS)} are for kind "
                              f"supervised, not {kind}")
        if spec.source_init and spec.source_init not in grid.inits:
            raise ConfigError(f"inits.{name}.source_init: no init {spec.source_init!r}; "
                              f"inits: {', '.join(grid.inits)}")
    return grid


# ----------------------------------------------------------------------------------------------
# Plan: pretraining jobs and cells
# ----------------------------------------------------------------------------------------------

@dataclass
class Cell:
    dataset: str
    init: str
    kind: str
    budget: Optional[int]
    seed: int
    name: str
    run_dir: Path
    config_path: str                    # fine-tuning config file
    overrides: list[str]                # complete, in order
    config: FinetuneConfig              # resolved (pretrained_path may not exist yet)
    eval_split: str
    pretraining: Optional[Pretraining] = None
    source: Optional[SourceJob] = None

    @property
    def dependencies(self) -> list:
        """The shared jobs that must be done before the cell runs."""
        return [job for job in (self.pretraining, self.source) if job is not None]

    @property
    def key(self) -> dict:
        return {"dataset": self.dataset, "init": self.init, "budget": self.budget,
                "seed": self.seed}


@dataclass
class Plan:
    grid: GridConfig
    pretrainings: list[Pretraining]
    cells: list[Cell]
    sources: list[SourceJob] = field(default_factory=list)


def budget_label(budget: Optional[int]) -> str:
    return "all" if budget is None else str(budget)


def cell_name(dataset: str, init: str, budget: Optional[int], seed: int) -> str:
    return f"{dataset}-{init}-N{budget_label(budget)}-s{seed}"


def _kind_overrides(kind: str, export: Optional[Path], pretrain_cfg: Optional[PretrainConfig],
                    source: Optional[SourceJob] = None) -> list[str]:
    overrides = [o.replace("{export}", str(export)) for o in KIND_OVERRIDES[kind]]
    if pretrain_cfg is not None and kind in ("simclr", "moco_v2", "moco_v3"):
        ssl = pretrain_cfg.ssl
        overrides += [f"model.encoder={ssl.encoder}",
                      "model.gray_adapter=" + ("in_channels" if ssl.in_channels == 1 else "repeat")]
    if kind == "checkpoint" and export is not None:
        # A saved regressor: its body, a new head (regressor_init.py). An SSL export is an smp
        # encoder; anything else a DDPM U-Net export.
        meta = export / "encoder.json"
        if (export / "regressor.json").is_file():
            model = json.loads((export / "regressor.json").read_text()).get("regressor") or {}
            arch = model.get("arch", "ddpm_unet")
            overrides += ["model.init=regressor"] + [
                f"model.{name}={model[name]}" for name in BODY_FIELDS.get(arch, ("arch",))
                if name in model]
        elif meta.is_file():
            info = json.loads(meta.read_text())
            overrides += ["model.arch=smp_unet", f"model.encoder={info.get('encoder', '')}",
                          "model.gray_adapter=" + (
                              "in_channels" if info.get("in_channels") == 1 else "repeat")]
        else:
            overrides += ["model.arch=ddpm_unet"]
    if source is not None:           # the architecture is the source's (regressor_init.py)
        model = source.config.model
        overrides += [f"model.{name}={getattr(model, name)}" for name in BODY_FIELDS[model.arch]]
    return overrides


def checkpoint_folder(init: str, path: str) -> Path:
    """inits.<init>.checkpoint as a folder: a glob (runs/.../ddpm-*/export: the hash of a
    pretraining run folder need not be copied by hand) must match exactly one folder."""
    if not any(char in path for char in "*?["):
        return Path(path)
    matches = sorted(p for p in Path().glob(path) if p.is_dir()) if not Path(path).is_absolute() \
        else sorted(p for p in Path("/").glob(path.lstrip("/")) if p.is_dir())
    if len(matches) != 1:
        found = ", ".join(map(str, matches)) or "nothing (run what makes it first)"
        raise ConfigError(f"inits.{init}.checkpoint: {path!r} must match exactly one folder; "
                          f"it matches {found}")
    return matches[0]


@dataclass
class InitResolution:
    """What an init gives the fine-tuning runs of one dataset."""
    kind: str
    overrides: list[str]                # the kind's, then the init's own
    pretraining: Optional[Pretraining] = None
    source: Optional[SourceJob] = None


def resolve_init(grid: GridConfig, init: str, dataset: str, ds: DatasetSpec, jobs: SharedJobs,
                 chain: tuple[str, ...] = ()) -> InitResolution:
    """The init's fine-tuning overrides for `dataset` and the shared job they start from
    (planned once in `jobs`); a supervised init's source job is itself initialised by resolving
    its source_init (for the same dataset), so chains share every job they have in common."""
    if init in chain:
        raise ConfigError(f"inits.{chain[0]}: source_init goes round in a circle: "
                          f"{' -> '.join(chain + (init,))}")
    spec = grid.inits[init]
    kind = spec.kind or init
    job, source, export = None, None, None
    if kind in PRETRAINED_KINDS:
        job = plan_pretraining(grid, init, spec, kind, dataset, ds, jobs)
        export = job.run_dir / spec.pretrain_weights
        if spec.pretrain_weights == "best" and not job.config.probe.every:
            raise ConfigError(f"inits.{init}.pretrain_weights=best needs the landmark "
                              f"probe in its pretraining (probe.every > 0)")
    elif kind == "checkpoint":
        export = checkpoint_folder(init, spec.checkpoint)
    elif kind == "supervised":
        base = InitResolution("", [])
        if spec.source_init:
            base = resolve_init(grid, spec.source_init, dataset, ds, jobs, chain + (init,))
            if base.kind == "mean_shape":
                raise ConfigError(f"inits.{init}.source_init: {spec.source_init!r} is the mean "
                                  f"shape, not a network to fine-tune")
        source = plan_source(grid, init, spec, base.overrides, base.pretraining, base.source,
                             jobs)
        export = source.export_dir
    overrides = _kind_overrides(kind, export, job.config if job else None, source) + \
        spec.overrides
    return InitResolution(kind, overrides, job, source)


def build_plan(grid: GridConfig) -> Plan:
    """Every cell's complete override list and resolved config (checked now, so a typo fails
    before hours of pretraining), and the distinct shared jobs (pretrainings, source
    fine-tunings) they start from."""
    jobs = SharedJobs()
    cells: list[Cell] = []
    for dataset, ds in grid.datasets.items():
        config_path = ds.finetune or f"configs/finetune/{dataset}.yaml"
        eval_split = ds.eval_split or grid.eval_split
        for init in grid.inits:
            res = resolve_init(grid, init, dataset, ds, jobs)
            init_overrides = grid.finetune_overrides + ds.overrides + res.overrides
            for budget in grid.budgets:
                for seed in grid.seeds:
                    name = cell_name(dataset, init, budget, seed)
                    run_dir = grid.grid_dir / "cells" / name
                    tags = [f"dataset:{dataset}", f"init:{init}", f"N:{budget_label(budget)}",
                            f"seed:{seed}"]
                    overrides = init_overrides + [
                        f"fewshot.budget={'null' if budget is None else budget}",
                        f"fewshot.draw={seed}", f"train.seed={seed}",
                        f"run.output_dir={run_dir.parent}", f"run.name={name}",
                        "train.resume=latest"] + logger_overrides(grid, tags)
                    try:
                        cfg = load_config(config_path, overrides, cls=FinetuneConfig)
                    except ConfigError as err:
                        raise ConfigError(f"cell {name}: {err}") from None
                    job = res.pretraining
                    if job is not None:
                        job.users.append(name)
                        if res.kind == "ddpm" and job.config.data.image_size != cfg.data.image_size:
                            log.warning("cell %s fine-tunes at %d px a U-Net pretrained at %d px",
                                        name, cfg.data.image_size, job.config.data.image_size)
                    if res.source is not None:
                        check_cell_source(name, cfg, eval_split, res.source)
                        res.source.users.append(name)
                    cells.append(Cell(dataset, init, res.kind, budget, seed, name, run_dir,
                                      config_path, overrides, cfg, eval_split, job, res.source))
    return Plan(grid, list(jobs.pretrainings.values()), cells, list(jobs.sources.values()))


def plan_summary(plan: Plan) -> dict:
    """What grid.json records of a plan (plain data)."""
    def after(job) -> list[str]:
        return [d.name for d in job.dependencies]
    return {"grid": to_dict(plan.grid),
            "pretrainings": [{"name": p.name, "method": p.method, "config": p.config_path,
                              "overrides": p.overrides, "users": p.users}
                             for p in plan.pretrainings],
            "sources": [{"name": s.name, "init": s.init, "config": s.config_path,
                         "overrides": s.overrides, "weights": s.weights, "after": after(s),
                         "users": s.users} for s in plan.sources],
            "cells": [{**c.key, "name": c.name, "kind": c.kind, "config": c.config_path,
                       "eval_split": c.eval_split,
                       "overrides": c.overrides,
                       "pretraining": c.pretraining.name if c.pretraining else None,
                       "source": c.source.name if c.source else None}
                      for c in plan.cells]}


__all__ = ["GridConfig", "DatasetSpec", "InitSpec", "LauncherConfig", "Plan", "Cell",
           "Pretraining", "SourceJob", "load_grid", "build_plan", "plan_summary", "INIT_KINDS",
           "cell_name", "budget_label"]
