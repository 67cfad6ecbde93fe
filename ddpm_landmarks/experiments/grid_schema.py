"""The experiment file: dataset x initialisation x label budget x seed (its expansion into
shared jobs and cells is experiments/grid_plan.py).

    grid = load_grid("experiments/cpu-small.yaml", overrides=["seeds=[0]"])

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
      spine_unet:                           # landmarks of another dataset first (shared_jobs.py)
        kind: supervised
        source: configs/finetune/aasce_spine.yaml
        source_init: imagenet               # ImageNet -> spine -> each dataset
        source_overrides: [fewshot.budget=null]

Init kinds (INIT_KINDS): `ddpm` and the SSL methods (`simclr`, `simclr_v2`, `moco_v2`,
`moco_v3`, `dino`) pretrain first (one run per distinct resolved pretraining config, shared by every cell that needs it:
all budgets and seeds, and every dataset whose pretraining config resolves to the same);
`imagenet`, `scratch` and `checkpoint` (an existing DDPM or SSL export, or a saved fine-tuned
regressor, whose body the cells fine-tune with a new head; the path may be a glob such as
`runs/grids/cpu-small/pretrain/ddpm-*/export` that must match exactly one folder) do not; `mean_shape`
is the trivial predictor (mean training landmark positions, no network); `released_ddpm` /
`released_ssl` fine-tune the authors' published DDPM U-Net / DenseNet161 SSL checkpoint file
(`checkpoint: PATH`, a glob matching one file); `supervised` fine-tunes
a source job's model (a fine-tuning on another labelled dataset, shared like a pretraining and
itself initialised by `source_init`, another init of the grid: chains; shared_jobs.py) with a new
head, in the source's architecture. The overrides of a fine-tuning cell are applied in this
order, the more specific later and winning: the grid's `finetune_overrides`, the dataset's, the
init kind's own (KIND_OVERRIDES: architecture, init, weights path), the init's `overrides`,
then the cell's (budget, seed, run folder, W&B group and tags). Pretraining: the grid's, the
dataset's, then the init's `pretrain_overrides`. Source fine-tuning: shared_jobs.py.

Two stages (`refine: {finetune: configs/finetune/isbi2015_refine.yaml, overrides: [...]}`):
every cell's stage-1 run is followed by a refinement run (training/refine_stage.py) in
`<cell>/refine-<hash>/` on its labelled images, whose local network the init sets too (the
init's `refine_pretrain`, `refine_pretrain_overrides`, `refine_overrides`; a ddpm init
pretrains it on crops at the refinement grid, shared like every pretraining). Overrides of a
refinement run: the refinement config, the grid's `refine.overrides`, the init kind's
(architecture, weights), the init's `refine_overrides`, then the cell's. The cell is scored
with both stages; the report has stage-1 and final rows and a side-by-side table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ddpm_landmarks.config.ranges import ranged
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.errors import ConfigError

log = logging.getLogger(__name__)

PRETRAINED_KINDS = ("ddpm", "simclr", "simclr_v2", "moco_v2", "moco_v3", "dino")
SSL_KINDS = PRETRAINED_KINDS[1:]
# mean_shape: no network, the average training landmark positions (the trivial reference row).
# released_ddpm / released_ssl: the authors' checkpoint files (inits.<name>.checkpoint, a
# released .pt / .pth; models/released_weights.py).
INIT_KINDS = PRETRAINED_KINDS + ("imagenet", "scratch", "checkpoint", "mean_shape", "supervised",
                                 "released_ddpm", "released_ssl")
SOURCE_FIELDS = ("source", "source_init", "source_overrides")
# Kinds whose cells get a refinement stage when the grid has one (the mean shape keeps its own).
REFINE_KINDS = PRETRAINED_KINDS + ("imagenet", "scratch", "mean_shape")

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
                                        # folder; released_*: the file; a glob must match one
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
    # The refinement stage (grid `refine`): the local network of this init's cells. Kind ddpm:
    # a DDPM U-Net pretrained on crops at the refinement grid by `refine_pretrain` (a
    # pretraining config, e.g. configs/pretrain/isbi2015_patches.yaml); the SSL kinds and
    # imagenet: the same encoder as stage 1; scratch: random init. Then refine_overrides.
    refine_pretrain: str = ""
    refine_pretrain_overrides: list[str] = field(default_factory=list)
    refine_overrides: list[str] = field(default_factory=list)


@dataclass
class RefineGridSpec:
    """Stage 2 of every cell (but the mean shape's): a refinement run (training/refine_stage.py)
    on the cell's stage-1 run, scored with stage 1 side by side. finetune "" = one stage."""
    finetune: str = ""                  # the refinement config (refine.enabled: true)
    overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)   # every refine_pretrain


@dataclass
class LauncherConfig:
    # inline: in this process (tests, debugging); process: one Python process per job;
    # accelerate: `accelerate launch --num_processes N [accelerate_args] -m ...` per job.
    kind: Literal["inline", "process", "accelerate"] = "process"
    num_processes: int = ranged(1, ">= 1")
    accelerate_args: list[str] = field(default_factory=list)   # e.g. [--multi_gpu, --mixed_precision=bf16]


@dataclass
class GridLoggerConfig:
    kind: Literal["wandb", "tensorboard", "none"] = "wandb"   # every run of the grid
    project: str = "ddpm-landmarks"
    entity: str = ""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class CostConfig:
    """--dry-run's assumptions (experiments/cost.py): GPU hours = FLOPs / (peak x efficiency);
    a network is timed on this machine only when a step should take <= max_timed_step_s."""
    gpu: str = "NVIDIA A100"
    # dense TF32: fp32 runs (cuDNN convolutions use TF32)
    gpu_peak_tflops: float = ranged(156.0, "> 0")
    gpu_peak_tflops_half: float = ranged(312.0, "> 0")  # dense bf16 / fp16
    # Share of the peak a conv U-Net step reaches (GroupNorm, activations and softmax are
    # memory-bound and not FLOPs; our CPU benchmark reaches 36-56 % of matmul peak).
    gpu_efficiency: float = ranged(0.35, "(0, 1]")
    max_timed_step_s: float = ranged(10.0, ">= 0")


@dataclass
class GridConfig:
    name: str = "grid"
    output_dir: str = "runs/grids"
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    inits: dict[str, InitSpec] = field(default_factory=dict)
    budgets: list[Optional[int]] = ranged([50], ">= 1")   # null = the whole training split
    seeds: list[int] = ranged([0], ">= 0")
    eval_split: str = "test1"
    finetune_overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)
    refine: RefineGridSpec = field(default_factory=RefineGridSpec)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: GridLoggerConfig = field(default_factory=GridLoggerConfig)
    cost: CostConfig = field(default_factory=CostConfig)      # --dry-run's GPU assumptions

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
    if len(set(grid.budgets)) != len(grid.budgets) or len(set(grid.seeds)) != len(grid.seeds):
        raise ConfigError(f"budgets {grid.budgets} / seeds {grid.seeds} repeat a value")
    for name, spec in grid.inits.items():
        kind = spec.kind or name
        if kind not in INIT_KINDS:
            raise ConfigError(f"inits.{name}: unknown kind {kind!r}; valid kinds: "
                              f"{', '.join(INIT_KINDS)} (set inits.{name}.kind)")
        if kind in ("checkpoint", "released_ddpm", "released_ssl") and not spec.checkpoint:
            raise ConfigError(f"inits.{name}: kind {kind} needs inits.{name}.checkpoint "
                              f"({'an export folder' if kind == 'checkpoint' else 'the file'})")
        if kind == "supervised" and not spec.source:
            raise ConfigError(f"inits.{name}: kind supervised needs inits.{name}.source (the "
                              f"source dataset's fine-tuning config)")
        if kind != "supervised" and any(getattr(spec, f) for f in SOURCE_FIELDS):
            raise ConfigError(f"inits.{name}: {', '.join(SOURCE_FIELDS)} are for kind "
                              f"supervised, not {kind}")
        if grid.refine.finetune and kind not in REFINE_KINDS:
            raise ConfigError(f"inits.{name}: kind {kind} has no refinement stage; refinable "
                              f"kinds: {', '.join(REFINE_KINDS)} (and mean_shape, left as is)")
        if grid.refine.finetune and kind == "ddpm" and not spec.refine_pretrain:
            raise ConfigError(f"inits.{name}: with a refinement stage a ddpm init needs "
                              f"refine_pretrain (the pretraining config of the local network, "
                              f"e.g. configs/pretrain/isbi2015_patches.yaml)")
        if spec.source_init and spec.source_init not in grid.inits:
            raise ConfigError(f"inits.{name}.source_init: no init {spec.source_init!r}; "
                              f"inits: {', '.join(grid.inits)}")
    return grid
