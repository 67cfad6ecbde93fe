"""What the three entry scripts (pretrain.py, finetune.py, classify.py) share, so that each one
reads top to bottom as data -> model -> train:

    launch = Launch.from_env(cfg)                 # rank, process count, run folder
    ...                                           # build and check data and model
    launch.write_run_folder(cfg, files)           # only now: config.yaml (+ splits, ...)
    trainer = make_trainer(method, dataset, cfg, launch, validate=..., param_groups=...)
    summary = trainer.fit()

    if __name__ == "__main__":
        sys.exit(script_main(finetune, FinetuneConfig, __doc__, "ddpm_landmarks.finetune"))

`Launch` is read from the launcher's environment (RANK / WORLD_SIZE, set by `accelerate
launch` and torchrun) because the Accelerator does not exist yet when a script builds its data.
Nothing is written into the run folder before the script has built and checked everything, so
a refused run leaves the folder as it was.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ddpm_landmarks.config.schema import load_config, save_config, to_dict
from ddpm_landmarks.config.training import TrainConfig
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.training.engine import Trainer
from ddpm_landmarks.training.trackers import (
    flatten_config,
    log_image_grids,
    tracker_setup,
)
from ddpm_landmarks.utils.atomic import atomic_write_text
from ddpm_landmarks.utils.logging_setup import setup_logging

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """This process's place in a (possibly multi-process) launch, and the run folder."""
    run_dir: Path
    rank: int
    world_size: int

    @classmethod
    def from_env(cls, cfg) -> "Launch":
        launch = cls(Path(cfg.run.output_dir) / cfg.run.name,
                     int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        setup_logging(None)
        return launch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def write_run_folder(self, cfg, files: Optional[dict[str, str]] = None) -> None:
        """Main process: create the run folder, write config.yaml and `files` (name -> text);
        every process: log to run_dir/log.txt (main) or stderr."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            for name, text in (files or {}).items():
                atomic_write_text(self.run_dir / name, text)
        setup_logging(self.run_dir if self.is_main else None)


class RepeatedDataset(Dataset):
    """The N labelled images repeated `times` times per epoch (each copy augmented anew), so
    that N = 1..10 still fills full batches on every process."""

    def __init__(self, dataset: Dataset, times: int):
        self.dataset, self.times = dataset, max(1, int(times))

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


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

    def init_trackers(accelerator) -> None:
        if log_with is not None:
            accelerator.init_trackers(cfg.logger.project, config=flatten_config(config_dict),
                                      init_kwargs=init_kwargs)

    try:
        return Trainer(method, dataset, train_cfg or cfg.train, cfg.optim, launch.run_dir,
                       config_dict,
                       log_with=log_with, init_trackers=init_trackers,
                       log_images=log_image_grids, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
