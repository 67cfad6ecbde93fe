"""Pretrain on unlabelled x-rays: a DDPM U-Net (default) or an SSL baseline's smp encoder.

One process:
    ddpm-landmarks pretrain configs/pretrain/synthetic.yaml train.max_steps=300
    ddpm-landmarks pretrain configs/pretrain/simclr_synthetic.yaml     # method: simclr
Several processes / GPUs / nodes (same flags, same config):
    accelerate launch -m ddpm_landmarks.pretrain --config configs/pretrain/isbi2015.yaml train.resume=latest

`method` (config key) picks the method from methods.METHODS: ddpm, simclr, moco_v2, moco_v3.
The run folder (run.output_dir/run.name) receives config.yaml, pretrain_images.txt (every image
trained on, for leakage audits), checkpoints/step_*/ (resumable), images/ (sample grids, or
the SSL views), the W&B / TensorBoard logs and, at the end, export/: for ddpm the EMA U-Net
(`UNet2DModel.from_pretrained`) with its scheduler and the resolved config; for the SSL
methods the encoder (encoder.safetensors + encoder.json, see methods.ssl_base). Fine-tuning
loads either. With probe.every = M > 0 a few-shot landmark probe of the frozen features
(evaluation/probe.py) runs every M steps: probe/* in metrics.jsonl and the trackers, and best/
holds the export at the best probe MRE. With curriculum.stages the pools, augmentation strength
and resolution change at configured steps (data/curriculum.py; the stage is logged as
train/stage, the images of each stage listed in pretrain_images_stage<i>.txt).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from accelerate.utils import set_seed

from ddpm_landmarks.config import ConfigError, load_config, save_config, to_dict
from ddpm_landmarks.data.curriculum import CurriculumImages, CurriculumSampler
from ddpm_landmarks.data.pretrain_data import build_pretrain_dataset, pool_weighted_subset
from ddpm_landmarks.data.sample import DataError
from ddpm_landmarks.methods import METHODS, SSL_METHODS
from ddpm_landmarks.training.config import PretrainConfig, TrainConfig, resolve_ssl_config
from ddpm_landmarks.training.engine import Trainer
from ddpm_landmarks.training.trackers import flatten_config, log_image_grids, tracker_setup
from ddpm_landmarks.utils.runs import setup_logging

log = logging.getLogger(__name__)


def _is_main_process() -> bool:
    # Before the Accelerator exists: `accelerate launch` / torchrun export RANK.
    return int(os.environ.get("RANK", "0")) == 0


def _resolve_method(cfg: PretrainConfig, method_name: Optional[str]) -> PretrainConfig:
    """cfg with `method` set (method_name overrides cfg.method) and, for an SSL method, the
    method's defaults filled into cfg.ssl, so that config.yaml records what the run used."""
    name = method_name or cfg.method
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r}; valid: {', '.join(METHODS)}")
    cfg = dataclasses.replace(cfg, method=name)
    if name in SSL_METHODS:
        from ddpm_landmarks.methods.ssl_base import encoder_out_channels
        try:
            channels = encoder_out_channels(cfg.ssl.encoder, cfg.ssl.in_channels)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"ssl.encoder={cfg.ssl.encoder!r} (in_channels "
                              f"{cfg.ssl.in_channels}): {err}") from None
        cfg = dataclasses.replace(cfg, ssl=resolve_ssl_config(name, cfg.ssl, channels))
    return cfg


def pretrain(cfg: PretrainConfig, method_name: Optional[str] = None) -> dict:
    """Run (or resume) one pretraining job; returns the engine's summary.

    method_name: overrides cfg.method (default: cfg.method, "ddpm" unless configured)."""
    cfg = _resolve_method(cfg, method_name)
    method_name = cfg.method
    check_probe_config(cfg)
    # ------------------------------------------------------------------ run folder
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    main = _is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir if main else None)

    # ------------------------------------------------------------------ data
    # Every process builds the same image list (pools are sorted; exclusions are exact); only
    # the main process writes the audit files.
    # SSL methods: the same pools, as two augmented views per image (data.ssl_views).
    views = cfg.ssl.views if method_name in SSL_METHODS else None
    images = build_pretrain_dataset(cfg, run_dir if main else None,
                                    seed=cfg.train.seed + int(os.environ.get("RANK", "0")),
                                    views=views)
    sampler, num_images = None, len(images)
    if isinstance(images, CurriculumImages):
        # Stages of pools / augmentation / resolution: the sampler gives each item the stage of
        # the optimiser step it trains in, the same on every process (data/curriculum.py).
        dataset, num_images = images, images.smallest_stage
        sampler = CurriculumSampler(images.curriculum, len(images), seed=cfg.train.seed)
    elif len({p.weight for p in images.pools.pools}) > 1:
        # Unequal pool weights: an epoch is a weighted subset of the pools (uniformly shuffled
        # by the engine); equal weights mean every image once per epoch.
        dataset = pool_weighted_subset(images, seed=cfg.train.seed)
    else:
        dataset = images
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(dataset) < cfg.train.batch_size * world:
        raise DataError(f"{len(dataset)} pretraining images cannot fill one batch of "
                        f"train.batch_size={cfg.train.batch_size} on {world} process(es)")

    # ------------------------------------------------------------------ method
    # Same seed on every process: identical initial weights (DDP would broadcast rank 0's
    # anyway) and a run that reproduces from its config.
    set_seed(cfg.train.seed)
    try:
        method = METHODS[method_name](cfg)
    except ValueError as err:          # unknown preset, resolution the U-Net cannot take,
        # a MoCo queue that is not a multiple of the global batch, ...
        raise ConfigError(str(err)) from None
    if hasattr(method, "check_data"):
        method.check_data(num_images)

    # ------------------------------------------------------------------ train
    config_dict = to_dict(cfg)
    log_with, init_kwargs = tracker_setup(cfg.logger, run_dir, run_name=cfg.run.name)

    def init_trackers(accelerator) -> None:
        if log_with is not None:
            accelerator.init_trackers(cfg.logger.project, config=flatten_config(config_dict),
                                      init_kwargs=init_kwargs)

    validate, train_cfg = build_probe(cfg, method)
    trainer = Trainer(method, dataset, train_cfg, cfg.optim, run_dir, config_dict,
                      log_with=log_with, init_trackers=init_trackers,
                      log_images=log_image_grids, validate=validate, monitor=PROBE_MONITOR,
                      sampler=sampler)
    summary = trainer.fit()
    if main:
        log.info("done: step %d, loss %.4f, %.1f images/s; export in %s", summary["step"],
                 summary["loss"], summary["images_per_s"], run_dir / "export")
        if validate is not None:
            log.info("best %s %.4f at step %d: export in %s", PROBE_MONITOR, summary["best"],
                     summary["best_step"], run_dir / "best")
    return summary


PROBE_MONITOR = "probe/mre"


def check_probe_config(cfg: PretrainConfig) -> None:
    """The engine's validation settings that pretraining does not take. Early stopping stays
    off: a probe picks a checkpoint, it does not end the run."""
    if cfg.train.early_stopping_patience:
        raise ConfigError("train.early_stopping_patience: pretraining does not stop early; "
                          "the landmark probe (probe.every) only selects best/")
    if cfg.train.eval_every:
        raise ConfigError("train.eval_every: pretraining has no validation of its own; the "
                          "landmark probe's interval is probe.every")


def build_probe(cfg: PretrainConfig, method) -> tuple[Optional[Callable], TrainConfig]:
    """(the engine's validate hook, the TrainConfig it runs with) for `cfg.probe`.

    Pretraining has no validation of its own: with probe.every > 0 the engine's validation
    (every train.eval_every steps and at the end, main process, EMA weights, best/ export) runs
    the landmark probe, so its interval is probe.every."""
    check_probe_config(cfg)
    if not cfg.probe.every:
        return None, cfg.train
    features = getattr(method, "probe_features", None)
    if features is None:
        raise ConfigError(f"probe.every: method {cfg.method!r} has no probe_features, so it "
                          f"cannot be probed; set probe.every=0")
    from ddpm_landmarks.evaluation.probe import LandmarkProbe
    # Built on every process (20 images), so a bad probe config fails everywhere at once; the
    # engine calls it on the main process only.
    probe = LandmarkProbe(cfg.probe, cfg.data, features)
    if _is_main_process():
        log.info("%s, every %d steps", probe.describe(), cfg.probe.every)
    return probe, dataclasses.replace(cfg.train, eval_every=cfg.probe.every)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m ddpm_landmarks.pretrain", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=500")
    return parser


def run_from_args(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides, cls=PretrainConfig)
    pretrain(cfg)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args.config, args.overrides)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
