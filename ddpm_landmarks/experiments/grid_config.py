"""An experiment grid: dataset x initialisation x label budget x seed, and its expansion into
pretraining jobs and fine-tuning cells.

    grid = load_grid("experiments/cpu-small.yaml", overrides=["seeds=[0]"])
    plan = build_plan(grid)            # plan.pretrainings (shared), plan.cells (one run each)

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

Init kinds (INIT_KINDS): `ddpm` and the SSL methods (`simclr`, `moco_v2`, `moco_v3`) pretrain
first (one run per distinct resolved pretraining config, shared by every cell that needs it:
all budgets and seeds, and every dataset whose pretraining config resolves to the same);
`imagenet`, `scratch` and `checkpoint` (an existing DDPM or SSL export) do not; `mean_shape`
is the trivial predictor (mean training landmark positions, no network). The overrides
of a fine-tuning cell are applied in this order, the more specific later and winning: the
grid's `finetune_overrides`, the dataset's, the init kind's own (KIND_OVERRIDES: architecture,
init, weights path), the init's `overrides`, then the cell's (budget, seed, run folder, W&B
group and tags). Pretraining: the grid's, the dataset's, then the init's `pretrain_overrides`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ddpm_landmarks.config import ConfigError, load_config, to_dict
from ddpm_landmarks.training.config import PretrainConfig
from ddpm_landmarks.training.finetune_config import FinetuneConfig

log = logging.getLogger(__name__)

PRETRAINED_KINDS = ("ddpm", "simclr", "moco_v2", "moco_v3")
# mean_shape: no network, the average training landmark positions (the trivial reference row).
INIT_KINDS = PRETRAINED_KINDS + ("imagenet", "scratch", "checkpoint", "mean_shape")

# Fine-tuning overrides of each init kind ({export} = the pretraining's or checkpoint's export
# folder; SSL kinds also get model.encoder and model.gray_adapter from the pretraining config).
KIND_OVERRIDES: dict[str, list[str]] = {
    "ddpm": ["model.arch=ddpm_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "simclr": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "moco_v2": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "moco_v3": ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    "imagenet": ["model.arch=smp_unet", "model.init=imagenet"],
    "scratch": ["model.init=scratch", "model.pretrained_path="],
    "checkpoint": ["model.init=pretrained", "model.pretrained_path={export}"],
    "mean_shape": [],
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
    checkpoint: str = ""                # kind=checkpoint: an export folder (DDPM U-Net or SSL)
    # Which weights of the pretraining the cells fine-tune: its last step ("export") or the step
    # with the best landmark probe ("best": needs probe.every > 0 in the pretraining config).
    pretrain_weights: Literal["export", "best"] = "export"
    overrides: list[str] = field(default_factory=list)


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
    return grid


# ----------------------------------------------------------------------------------------------
# Plan: pretraining jobs and cells
# ----------------------------------------------------------------------------------------------

@dataclass
class Pretraining:
    name: str                           # folder under <grid>/pretrain/
    method: str
    config_path: str
    overrides: list[str]                # complete: run folder, logger, resume included
    config: PretrainConfig              # resolved
    run_dir: Path
    users: list[str] = field(default_factory=list)   # cell names

    @property
    def export_dir(self) -> Path:
        """The last step's export (what the job must have written to count as done)."""
        return self.run_dir / "export"


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

    @property
    def key(self) -> dict:
        return {"dataset": self.dataset, "init": self.init, "budget": self.budget,
                "seed": self.seed}


@dataclass
class Plan:
    grid: GridConfig
    pretrainings: list[Pretraining]
    cells: list[Cell]


def budget_label(budget: Optional[int]) -> str:
    return "all" if budget is None else str(budget)


def cell_name(dataset: str, init: str, budget: Optional[int], seed: int) -> str:
    return f"{dataset}-{init}-N{budget_label(budget)}-s{seed}"


def _logger_overrides(grid: GridConfig, tags: list[str]) -> list[str]:
    lg = grid.logger
    return [f"logger.kind={lg.kind}", f"logger.project={lg.project}",
            f"logger.entity={lg.entity}", f"logger.wandb_mode={lg.wandb_mode}",
            f"logger.group={grid.name}", f"logger.tags={json.dumps(tags)}"]


def _config_key(cfg) -> str:
    """Hash of a resolved config without its run folder, logger and resume setting: two
    pretrainings with the same key train the same model."""
    data = to_dict(cfg)
    for section in ("run", "logger"):
        data.pop(section, None)
    data["train"] = {k: v for k, v in data["train"].items() if k != "resume"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _default_pretrain_config(kind: str, dataset: str) -> str:
    return f"configs/pretrain/{dataset}.yaml" if kind == "ddpm" else \
        f"configs/pretrain/{kind}_{dataset}.yaml"


def _plan_pretraining(grid: GridConfig, init: str, spec: InitSpec, kind: str, dataset: str,
                      ds: DatasetSpec, known: dict[str, Pretraining]) -> Pretraining:
    path = spec.pretrain or _default_pretrain_config(kind, dataset)
    base = grid.pretrain_overrides + ds.pretrain_overrides + spec.pretrain_overrides + \
        [f"method={kind}"]
    where = f"pretraining of init {init!r} for dataset {dataset!r}"
    try:
        cfg = load_config(path, base, cls=PretrainConfig)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    key = _config_key(cfg)
    if key in known:
        return known[key]
    name = f"{init}-{key}"
    run_dir = grid.grid_dir / "pretrain" / name
    overrides = base + [f"run.output_dir={run_dir.parent}", f"run.name={name}",
                        "train.resume=latest"] + \
        _logger_overrides(grid, ["pretrain", f"init:{init}", f"method:{kind}"])
    cfg = load_config(path, overrides, cls=PretrainConfig)
    job = Pretraining(name, kind, path, overrides, cfg, run_dir)
    known[key] = job
    return job


def _kind_overrides(kind: str, export: Optional[Path], pretrain_cfg: Optional[PretrainConfig]
                    ) -> list[str]:
    overrides = [o.replace("{export}", str(export)) for o in KIND_OVERRIDES[kind]]
    if pretrain_cfg is not None and kind in ("simclr", "moco_v2", "moco_v3"):
        ssl = pretrain_cfg.ssl
        overrides += [f"model.encoder={ssl.encoder}",
                      "model.gray_adapter=" + ("in_channels" if ssl.in_channels == 1 else "repeat")]
    if kind == "checkpoint" and export is not None:
        # An SSL export is an smp encoder; anything else a DDPM U-Net export.
        meta = export / "encoder.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            overrides += ["model.arch=smp_unet", f"model.encoder={info.get('encoder', '')}",
                          "model.gray_adapter=" + (
                              "in_channels" if info.get("in_channels") == 1 else "repeat")]
        else:
            overrides += ["model.arch=ddpm_unet"]
    return overrides


def build_plan(grid: GridConfig) -> Plan:
    """Every cell's complete override list and resolved config (checked now, so a typo fails
    before hours of pretraining), and the distinct pretraining jobs they share."""
    known: dict[str, Pretraining] = {}
    cells: list[Cell] = []
    for dataset, ds in grid.datasets.items():
        config_path = ds.finetune or f"configs/finetune/{dataset}.yaml"
        for init, spec in grid.inits.items():
            kind = spec.kind or init
            job = None
            export = None
            if kind in PRETRAINED_KINDS:
                job = _plan_pretraining(grid, init, spec, kind, dataset, ds, known)
                export = job.run_dir / spec.pretrain_weights
                if spec.pretrain_weights == "best" and not job.config.probe.every:
                    raise ConfigError(f"inits.{init}.pretrain_weights=best needs the landmark "
                                      f"probe in its pretraining (probe.every > 0)")
            elif kind == "checkpoint":
                export = Path(spec.checkpoint)
            init_overrides = grid.finetune_overrides + ds.overrides + \
                _kind_overrides(kind, export, job.config if job else None) + spec.overrides
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
                        "train.resume=latest"] + _logger_overrides(grid, tags)
                    try:
                        cfg = load_config(config_path, overrides, cls=FinetuneConfig)
                    except ConfigError as err:
                        raise ConfigError(f"cell {name}: {err}") from None
                    if job is not None:
                        job.users.append(name)
                        if kind == "ddpm" and job.config.data.image_size != cfg.data.image_size:
                            log.warning("cell %s fine-tunes at %d px a U-Net pretrained at %d px",
                                        name, cfg.data.image_size, job.config.data.image_size)
                    cells.append(Cell(dataset, init, kind, budget, seed, name, run_dir,
                                      config_path, overrides, cfg,
                                      ds.eval_split or grid.eval_split, job))
    return Plan(grid, list(known.values()), cells)


def plan_summary(plan: Plan) -> dict:
    """What grid.json records of a plan (plain data)."""
    return {"grid": to_dict(plan.grid),
            "pretrainings": [{"name": p.name, "method": p.method, "config": p.config_path,
                              "overrides": p.overrides, "users": p.users}
                             for p in plan.pretrainings],
            "cells": [{**c.key, "name": c.name, "kind": c.kind, "config": c.config_path,
                       "eval_split": c.eval_split,
                       "overrides": c.overrides,
                       "pretraining": c.pretraining.name if c.pretraining else None}
                      for c in plan.cells]}


__all__ = ["GridConfig", "DatasetSpec", "InitSpec", "LauncherConfig", "Plan", "Cell",
           "Pretraining", "load_grid", "build_plan", "plan_summary", "INIT_KINDS",
           "cell_name", "budget_label"]
