"""What the three entry scripts (pretrain.py, finetune.py, classify.py) share, so that each one
reads top to bottom as data -> model -> train:

    launch = Launch.from_env(cfg)       # rank, process count; the run folder claimed and locked
    ...                                 # build and check data and model
    launch.write_run_folder(cfg, files) # only now: config.yaml (+ splits, ...)
    trainer = make_trainer(method, dataset, cfg, launch, validate=..., param_groups=...)
    summary = trainer.fit()

    if __name__ == "__main__":
        sys.exit(script_main(finetune, FinetuneConfig, __doc__, "ddpm_landmarks.finetune"))

`Launch` is read from the launcher's environment (RANK / WORLD_SIZE, set by `accelerate
launch` and torchrun) because the Accelerator does not exist yet when a script builds its data.
It claims the run folder first (training/run_folder.py: one run per folder, a lock, the resumed
checkpoint read and its config compared), and nothing is written into the folder before the
script has built and checked everything, so a refused run leaves the folder as it was. The W&B
run id is kept in the run folder (wandb_run.json), so a resumed run continues its W&B run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ddpm_landmarks.config.schema import config_text, load_config, to_dict
from ddpm_landmarks.config.training import TrainConfig
from ddpm_landmarks.errors import ConfigError, DataError, NonFiniteError
from ddpm_landmarks.training.engine import Trainer
from ddpm_landmarks.training.run_folder import RunFolder, claim_run_folder
from ddpm_landmarks.training.trackers import (
    flatten_config,
    log_image_grids,
    tracker_setup,
)
from ddpm_landmarks.utils.atomic import atomic_write_text
from ddpm_landmarks.utils.logging_setup import setup_logging

log = logging.getLogger(__name__)


WANDB_RUN_FILE = "wandb_run.json"


@dataclass
class Launch:
    """This process's place in a (possibly multi-process) launch, and its claim on the run
    folder (folder.resume_from: the checkpoint to continue from, read and checked)."""
    run_dir: Path
    rank: int
    world_size: int
    folder: RunFolder

    @classmethod
    def from_env(cls, cfg) -> "Launch":
        setup_logging(None)
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        folder = claim_run_folder(run_dir, to_dict(cfg), cfg.train.resume, cfg.run.overwrite,
                                  is_main=rank == 0, rank=rank, with_ema=cfg.train.ema,
                                  defaults=to_dict(type(cfg)()))
        return cls(run_dir, rank, world, folder)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def write_run_folder(self, cfg, files: Optional[dict[str, str]] = None) -> None:
        """Main process: write config.yaml and `files` (name -> text) into the run folder, cut
        metrics.jsonl and best/ back to a resumed checkpoint; every process: log to
        run_dir/log.txt (main) or stderr."""
        self.folder.commit({"config.yaml": config_text(cfg), **(files or {})})
        setup_logging(self.run_dir if self.is_main else None)

    def release(self) -> None:
        """The run is over: give the run folder's lock up."""
        self.folder.release()

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:  # finished or refused: the lock goes either way
        self.release()

    def wandb_run_id(self) -> str:
        """The W&B run id of this run folder: kept across resumes, new for a fresh run."""
        path = self.run_dir / WANDB_RUN_FILE
        if self.folder.resume_from is not None or self.folder.restart:
            try:
                return str(json.loads(path.read_text())["id"])
            except (OSError, ValueError, KeyError):
                pass
        run_id = uuid.uuid4().hex[:8]
        if self.is_main:
            atomic_write_text(path, json.dumps({"id": run_id}) + "\n")
        return run_id


class RepeatedDataset(Dataset):
    """The N labelled images repeated `times` times per epoch, so that N = 1..10 still fills
    full batches on every process. Each copy is augmented anew: copy c of image i draws from
    the generator of item c * N + i (the wrapped dataset's item(index, rng) and item_rng)."""

    def __init__(self, dataset: Dataset, times: int):
        self.dataset, self.times = dataset, max(1, int(times))

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        rng = self.dataset.item_rng(index) if self.dataset.train else None
        return self.dataset.item(index % len(self.dataset), rng)


def repeated_to_fill(dataset: Dataset, batch_size: int, launch: Launch) -> RepeatedDataset:
    """`dataset` repeated often enough for one batch of `batch_size` on every process."""
    return RepeatedDataset(dataset, math.ceil(batch_size * launch.world_size / len(dataset)))


def make_trainer(method, dataset: Dataset, cfg, launch: Launch,
                 train_cfg: Optional[TrainConfig] = None, **kwargs) -> Trainer:
    """The engine for `cfg` (its train - or `train_cfg` -, optim and logger sections) with the
    run's trackers (W&B / TensorBoard / none) and image logging; keyword arguments go to
    Trainer (validate, monitor, param_groups, sampler). A setting the engine refuses is a
    ConfigError."""
    config_dict = to_dict(cfg)
    log_with, init_kwargs = tracker_setup(cfg.logger, launch.run_dir, run_name=cfg.run.name)
    if log_with == "wandb":
        # One W&B run per run folder: a resumed run continues it (resume="allow").
        init_kwargs["wandb"].update(id=launch.wandb_run_id(), resume="allow")

    def init_trackers(accelerator) -> None:
        if log_with is not None:
            accelerator.init_trackers(cfg.logger.project, config=flatten_config(config_dict),
                                      init_kwargs=init_kwargs)

    try:
        trainer = Trainer(method, dataset, train_cfg or cfg.train, cfg.optim, launch.run_dir,
                          config_dict, log_with=log_with, init_trackers=init_trackers,
                          log_images=log_image_grids, resume_from=launch.folder.resume_from,
                          **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return trainer


def script_main(run: Callable, config_cls: type, doc: str, module: str,
                argv: Optional[list[str]] = None) -> int:
    """`python -m <module> --config FILE overrides...`: load the config, run, and turn a config
    or data error into `error: ...` on stderr and exit status 2."""
    parser = build_parser(module, doc)
    args = parser.parse_args(argv)
    try:
        run(load_config(args.config, args.overrides, cls=config_cls))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser(module: str, doc: str,
                 parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """--config FILE and dotted overrides (the `accelerate launch -m` form of every script)."""
    parser = parser or argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=500")
    return parser
