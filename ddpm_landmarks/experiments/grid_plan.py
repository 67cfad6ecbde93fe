"""A grid's plan: the experiment file (grid_schema.py) expanded into shared jobs (pretrainings,
source fine-tunings: shared_jobs.py) and fine-tuning cells, every config resolved and checked
before anything runs.

    plan = build_plan(load_grid("experiments/cpu-small.yaml"))
    plan.pretrainings, plan.sources (shared), plan.cells (one run each)
    check_plan_inputs(plan)            # every job's start-up data check, before any job runs
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ddpm_landmarks.config.finetune import BODY_FIELDS, FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config, to_dict
from ddpm_landmarks.data.checks import check_run_inputs
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.experiments.grid_schema import (
    PRETRAINED_KINDS,
    SSL_KINDS,
    DatasetSpec,
    GridConfig,
)
from ddpm_landmarks.experiments.shared_jobs import (
    Pretraining,
    SharedJobs,
    SourceJob,
    check_cell_source,
    config_key,
    logger_overrides,
    plan_pretraining,
    plan_refine_pretraining,
    plan_source,
)
from ddpm_landmarks.models.artifacts import identify, read_meta

log = logging.getLogger(__name__)

# Fine-tuning overrides of each init kind ({export} = the pretraining's, checkpoint's or source
# job's weights folder; SSL kinds also get model.encoder and model.gray_adapter from the
# pretraining config, supervised the source's architecture: _kind_overrides).
KIND_OVERRIDES: dict[str, list[str]] = {
    "ddpm": ["model.arch=ddpm_unet", "model.init=pretrained", "model.pretrained_path={export}"],
    **{kind: ["model.arch=smp_unet", "model.init=pretrained", "model.pretrained_path={export}"]
       for kind in SSL_KINDS},
    # The authors' files: their U-Net; their DenseNet161 backbone in an smp U-Net (3 channels).
    "released_ddpm": ["model.arch=released_unet", "model.init=released_ddpm",
                      "model.pretrained_path={export}"],
    "released_ssl": ["model.arch=smp_unet", "model.init=released_ssl", "model.encoder=densenet161",
                     "model.gray_adapter=repeat", "model.pretrained_path={export}"],
    "imagenet": ["model.arch=smp_unet", "model.init=imagenet"],
    "scratch": ["model.init=scratch", "model.pretrained_path="],
    "checkpoint": ["model.init=pretrained", "model.pretrained_path={export}"],
    "mean_shape": [],
    "supervised": ["model.init=regressor", "model.pretrained_path={export}"],
}


# ----------------------------------------------------------------------------------------------
# Plan: pretraining jobs and cells
# ----------------------------------------------------------------------------------------------

@dataclass
class RefineJob:
    """A cell's refinement run (stage 2) on the cell's stage-1 run, in <cell>/refine-<key>/."""
    config_path: str
    overrides: list[str]                # complete, in order
    config: FinetuneConfig              # resolved
    run_dir: Path
    key: str                            # of the resolved config: a changed stage 2 re-runs
    pretraining: Optional[Pretraining] = None    # the local network's (ddpm inits)


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
    config_hash: str = ""               # of the resolved config (shared_jobs.config_key)
    refine: Optional[RefineJob] = None  # stage 2, when the grid has one

    @property
    def dependencies(self) -> list:
        """The shared jobs that must be done before the cell runs."""
        jobs = (self.pretraining, self.source, self.refine.pretraining if self.refine else None)
        return [job for job in jobs if job is not None]

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
    if pretrain_cfg is not None and kind in SSL_KINDS:
        ssl = pretrain_cfg.ssl
        overrides += [f"model.encoder={ssl.encoder}",
                      "model.gray_adapter=" + ("in_channels" if ssl.in_channels == 1 else "repeat")]
    if kind == "checkpoint" and export is not None:
        # A saved regressor: its body, a new head (models/transfer_init.py). An SSL export is an
        # smp encoder; anything else a DDPM U-Net export (checked when the cell builds it).
        found = identify(export)
        if found == "regressor":
            model = read_meta(export, "regressor", "inits checkpoint")["regressor"]
            arch = model.get("arch", "ddpm_unet")
            overrides += ["model.init=regressor"] + [
                f"model.{name}={model[name]}" for name in BODY_FIELDS.get(arch, ("arch",))
                if name in model]
        elif found == "ssl_encoder":
            info = read_meta(export, "ssl_encoder", "inits checkpoint")
            overrides += ["model.arch=smp_unet", f"model.encoder={info['encoder']}",
                          "model.gray_adapter=" + (
                              "in_channels" if info["in_channels"] == 1 else "repeat")]
        else:
            overrides += ["model.arch=ddpm_unet"]
    if source is not None:           # the architecture is the source's (transfer_init.py)
        model = source.config.model
        overrides += [f"model.{name}={getattr(model, name)}" for name in BODY_FIELDS[model.arch]]
    return overrides


def checkpoint_folder(init: str, path: str, files: bool = False) -> Path:
    """inits.<init>.checkpoint as a folder (files=True: a file): a glob (runs/.../ddpm-*/export:
    the hash of a pretraining run folder need not be copied by hand) must match exactly one."""
    if not any(char in path for char in "*?["):
        return Path(path)
    wanted = Path.is_file if files else Path.is_dir
    matches = sorted(p for p in Path().glob(path) if wanted(p)) if not Path(path).is_absolute() \
        else sorted(p for p in Path("/").glob(path.lstrip("/")) if wanted(p))
    what = "file" if files else "folder"
    if len(matches) != 1:
        found = ", ".join(map(str, matches)) or "nothing (run what makes it first)"
        raise ConfigError(f"inits.{init}.checkpoint: {path!r} must match exactly one {what}; "
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
    elif kind in ("checkpoint", "released_ddpm", "released_ssl"):
        export = checkpoint_folder(init, spec.checkpoint, files=kind != "checkpoint")
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


def resolve_refine(grid: GridConfig, init: str, stage1: InitResolution,
                   jobs: SharedJobs) -> Optional[InitResolution]:
    """The overrides (and shared pretraining) of the init's refinement runs; None without a
    refinement stage or for the mean shape."""
    if not grid.refine.finetune or stage1.kind == "mean_shape":
        return None
    spec = grid.inits[init]
    job, export, pretrain_cfg = None, None, None
    if stage1.kind == "ddpm":
        job = plan_refine_pretraining(grid, init, spec, jobs)
        export = job.run_dir / "export"
    elif stage1.pretraining is not None:        # SSL kinds: stage 1's encoder on patches
        export = stage1.pretraining.run_dir / spec.pretrain_weights
        pretrain_cfg = stage1.pretraining.config
    overrides = _kind_overrides(stage1.kind, export, pretrain_cfg) + spec.refine_overrides
    return InitResolution(stage1.kind, overrides, job)


def plan_refine_job(grid: GridConfig, cell_name: str, stage1_cfg: FinetuneConfig,
                    stage1_dir: Path, res: InitResolution, tags: list[str]) -> RefineJob:
    """A cell's refinement run: the refinement config, the grid's refine.overrides, the init's
    (res), then stage 1's data grid and few-shot split and the cell's seed and folders."""
    path = grid.refine.finetune
    data, few = stage1_cfg.data, stage1_cfg.fewshot
    same = [f"data.{k}={getattr(data, k)}" for k in ("dataset", "root", "ground_truth",
                                                      "train_split", "eval_split",
                                                      "image_size", "resize_mode")] + \
        [f"fewshot.{k}={'null' if getattr(few, k) is None else getattr(few, k)}"
         for k in ("budget", "draw", "seed", "policy", "val_policy", "val_count")]
    base = grid.refine.overrides + res.overrides + same + [
        f"train.seed={stage1_cfg.train.seed}", "refine.enabled=true",
        f"refine.stage1={stage1_dir}"]
    try:
        key = config_key(load_config(path, base, cls=FinetuneConfig))
        run_dir = stage1_dir / f"refine-{key}"
        overrides = base + [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
                            "train.resume=latest"] + logger_overrides(grid, tags + ["stage:refine"])
        cfg = load_config(path, overrides, cls=FinetuneConfig)
    except ConfigError as err:
        raise ConfigError(f"cell {cell_name}, refinement ({path}): {err}") from None
    if res.pretraining is not None:
        res.pretraining.users.append(f"{cell_name}:refine")
    return RefineJob(path, overrides, cfg, run_dir, key, res.pretraining)


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
            refine_res = resolve_refine(grid, init, res, jobs)
            init_overrides = grid.finetune_overrides + ds.overrides + res.overrides
            for budget in grid.budgets:
                for seed in grid.seeds:
                    name = cell_name(dataset, init, budget, seed)
                    tags = [f"dataset:{dataset}", f"init:{init}", f"N:{budget_label(budget)}",
                            f"seed:{seed}"]
                    cell_overrides = init_overrides + [
                        f"fewshot.budget={'null' if budget is None else budget}",
                        f"fewshot.draw={seed}", f"train.seed={seed}"]
                    try:
                        # The folder is keyed by the resolved config (without run / logger):
                        # an edited experiment file re-runs exactly the cells it changes.
                        key = config_key(load_config(config_path, cell_overrides,
                                                     cls=FinetuneConfig))
                        run_dir = grid.grid_dir / "cells" / f"{name}-{key}"
                        overrides = cell_overrides + [
                            f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
                            "train.resume=latest"] + logger_overrides(grid, tags)
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
                    refine = None if refine_res is None else \
                        plan_refine_job(grid, name, cfg, run_dir, refine_res, tags)
                    cells.append(Cell(dataset, init, res.kind, budget, seed, name, run_dir,
                                      config_path, overrides, cfg, eval_split, job, res.source,
                                      config_hash=key, refine=refine))
    return Plan(grid, list(jobs.pretrainings.values()), cells, list(jobs.sources.values()))


def check_plan_inputs(plan: Plan) -> None:
    """The start-up checks every job makes (data/checks.py), for all jobs before the first
    one runs, so that a broken image or landmark fails the grid now rather than after hours of
    pretraining. Each distinct input is checked once: a pretraining's pools, and for
    fine-tuning jobs the whole training split (every budget and seed draws from it) and the
    evaluation split of each distinct data section."""
    seen: set[str] = set()
    for job in [*plan.pretrainings, *plan.sources, *plan.cells]:
        cfg = job.config
        if isinstance(cfg, FinetuneConfig):
            cfg = dataclasses.replace(cfg, fewshot=dataclasses.replace(
                cfg.fewshot, budget=None, val_policy="none"))
            key = repr(("finetune", to_dict(cfg.data), getattr(job, "eval_split", "")))
            if getattr(job, "eval_split", ""):
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                    cfg.data, eval_split=job.eval_split))
        else:
            key = repr(("pretrain", to_dict(cfg.data), to_dict(cfg.unlabeled),
                        to_dict(cfg.probe)))
        if key in seen:
            continue
        seen.add(key)
        try:
            check_run_inputs(cfg)
        except (ConfigError, DataError) as err:
            raise type(err)(f"{job.name}: {err}") from None


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
                       "config_hash": c.config_hash, "run_dir": str(c.run_dir),
                       "eval_split": c.eval_split,
                       "overrides": c.overrides,
                       "pretraining": c.pretraining.name if c.pretraining else None,
                       "source": c.source.name if c.source else None,
                       "refine": None if c.refine is None else {
                           "config": c.refine.config_path, "overrides": c.refine.overrides,
                           "run_dir": str(c.refine.run_dir), "key": c.refine.key,
                           "pretraining": c.refine.pretraining.name
                           if c.refine.pretraining else None}}
                      for c in plan.cells]}
