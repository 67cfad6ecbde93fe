"""Pretrain on unlabelled x-rays: a DDPM U-Net (default) or an SSL baseline's smp encoder.

One process:
    ddpm-landmarks pretrain configs/pretrain/synthetic.yaml train.max_steps=300
    ddpm-landmarks pretrain configs/pretrain/simclr_synthetic.yaml     # method: simclr
Several processes / GPUs / nodes (same flags, same config):
    accelerate launch -m ddpm_landmarks.pretrain --config configs/pretrain/isbi2015.yaml train.resume=latest

`method` (config key) picks the method from methods.registry.PRETRAINING_METHODS: ddpm, simclr,
simclr_v2, moco_v2, moco_v3, dino. The run folder (run.output_dir/run.name) receives config.yaml,
pretrain_images.txt (every image trained on, for leakage audits), checkpoints/step_*/
(resumable), images/ (sample grids, or the SSL views), the W&B / TensorBoard logs and, at the
end, export/: for ddpm the EMA U-Net (`UNet2DModel.from_pretrained`) with its scheduler and the
resolved config; for the SSL methods the encoder (encoder.safetensors + encoder.json, see
models/artifacts.py). Fine-tuning loads either. With probe.every = M > 0 a few-shot landmark
probe of the frozen features (training/probe.py) runs every M steps: probe/* in metrics.jsonl
and the trackers, and best/ holds the export at the best probe MRE. With curriculum.stages the
pools, augmentation strength and resolution change at configured steps (data/curriculum.py;
the stage is logged as train/stage, the images of each stage listed in
pretrain_images_stage<i>.txt).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, Optional

import torch
from accelerate.utils import set_seed

from ddpm_landmarks.config.pretrain import PretrainConfig, resolve_ssl_config
from ddpm_landmarks.config.training import TrainConfig
from ddpm_landmarks.data.checks import check_run_inputs
from ddpm_landmarks.data.pretrain_sets import pretraining_data
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.methods.registry import (
    MULTI_CROP_METHODS,
    PRETRAINING_METHODS,
    SSL_METHODS,
)
from ddpm_landmarks.models.encoder_weights import smp_encoder_channels
from ddpm_landmarks.models.unet import build_unet
from ddpm_landmarks.training.launch import Launch, make_trainer, script_main
from ddpm_landmarks.training.probe import LandmarkProbe

log = logging.getLogger(__name__)

PROBE_MONITOR = "probe/mre"


def pretrain(cfg: PretrainConfig, method_name: Optional[str] = None) -> dict:
    """Run (or resume) one pretraining job; returns the engine's summary.

    method_name: overrides cfg.method (default: cfg.method, "ddpm" unless configured)."""
    cfg = resolve_method(cfg, method_name)
    check_probe_config(cfg)
    check_stage_resolutions(cfg)
    with Launch.from_env(cfg) as launch:
        check_run_inputs(cfg)              # every image decodes, landmarks, spacing

        # ------------------------------------------------------------------ data
        # Every process builds the same image list (pools are sorted; exclusions are exact).
        # SSL methods: the same pools, as two augmented views per image (data/ssl_views.py).
        views = cfg.ssl.views if cfg.method in SSL_METHODS else None
        data = pretraining_data(cfg, seed=cfg.train.seed + launch.rank, views=views)
        if len(data.dataset) < cfg.train.batch_size * launch.world_size:
            raise DataError(f"{len(data.dataset)} pretraining images cannot fill one batch of "
                            f"train.batch_size={cfg.train.batch_size} on {launch.world_size} "
                            f"process(es)")

        # ------------------------------------------------------------------ method
        # Same seed on every process: identical initial weights (DDP would broadcast rank 0's
        # anyway) and a run that reproduces from its config.
        set_seed(cfg.train.seed)
        try:
            method = PRETRAINING_METHODS[cfg.method](cfg)
        except ValueError as err:          # unknown preset, resolution the U-Net cannot take,
            # a MoCo queue that is not a multiple of the global batch, ...
            raise ConfigError(str(err)) from None
        method.check_data(data.num_images)
        validate, train_cfg = build_probe(cfg, method, launch)

        # ------------------------------------------------------------------ train
        launch.write_run_folder(cfg, data.audit_files)
        trainer = make_trainer(method, data.dataset, cfg, launch, train_cfg=train_cfg,
                               validate=validate, monitor=PROBE_MONITOR, sampler=data.sampler)
        summary = trainer.fit()
    if launch.is_main:
        log.info("done: step %d, loss %.4f, %.1f images/s; export in %s", summary["step"],
                 summary["loss"], summary["images_per_s"], launch.run_dir / "export")
        if validate is not None:
            log.info("best %s %.4f at step %d: export in %s", PROBE_MONITOR, summary["best"],
                     summary["best_step"], launch.run_dir / "best")
    return summary


def resolve_method(cfg: PretrainConfig, method_name: Optional[str] = None) -> PretrainConfig:
    """cfg with `method` set (method_name overrides cfg.method) and, for an SSL method, the
    method's defaults filled into cfg.ssl, so that config.yaml records what the run used."""
    name = method_name or cfg.method
    if name not in PRETRAINING_METHODS:
        raise ConfigError(f"method: unknown method {name!r}; valid: "
                          f"{', '.join(PRETRAINING_METHODS)}")
    cfg = dataclasses.replace(cfg, method=name)
    if cfg.ssl.views.local_crops and name not in MULTI_CROP_METHODS:
        raise ConfigError(f"ssl.views.local_crops={cfg.ssl.views.local_crops}: local crops are "
                          f"for {', '.join(MULTI_CROP_METHODS)}, not {name}; set 0")
    if name in SSL_METHODS:
        try:
            channels = smp_encoder_channels(cfg.ssl.encoder, cfg.ssl.in_channels)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"ssl.encoder={cfg.ssl.encoder!r} (in_channels "
                              f"{cfg.ssl.in_channels}): {err}") from None
        cfg = dataclasses.replace(cfg, ssl=resolve_ssl_config(name, cfg.ssl, channels))
    return cfg


def check_probe_config(cfg: PretrainConfig) -> None:
    """The engine's validation settings that pretraining does not take. Early stopping stays
    off: a probe picks a checkpoint, it does not end the run."""
    if cfg.train.early_stopping_patience:
        raise ConfigError("train.early_stopping_patience: pretraining does not stop early; "
                          "the landmark probe (probe.every) only selects best/")
    if cfg.train.eval_every:
        raise ConfigError("train.eval_every: pretraining has no validation of its own; the "
                          "landmark probe's interval is probe.every")


def check_stage_resolutions(cfg: PretrainConfig) -> None:
    """A curriculum stage's image_size must fit the DDPM U-Net's depth (checked on the meta
    device: no memory), before any data is built."""
    if cfg.method != "ddpm":
        return
    for i, stage in enumerate(cfg.curriculum.stages):
        if not (isinstance(stage.image_size, int) and stage.image_size > 0):
            continue                   # None = data.image_size; non-positive: data's error
        try:
            with torch.device("meta"):
                build_unet(dataclasses.replace(cfg.model, sample_size=None),
                           image_size=stage.image_size)
        except ValueError as err:
            raise ConfigError(f"curriculum.stages[{i}].image_size: {err}") from None


def build_probe(cfg: PretrainConfig, method, launch: Launch
                ) -> tuple[Optional[Callable], TrainConfig]:
    """(the engine's validate hook, the TrainConfig it runs with) for `cfg.probe`.

    Pretraining has no validation of its own: with probe.every > 0 the engine's validation
    (every train.eval_every steps and at the end, main process, EMA weights, best/ export) runs
    the landmark probe, so its interval is probe.every."""
    if not cfg.probe.every:
        return None, cfg.train
    if method.probe_features is None:
        raise ConfigError(f"probe.every: method {cfg.method!r} has no probe_features, so it "
                          f"cannot be probed; set probe.every=0")
    # Built on every process (20 images), so a bad probe config fails everywhere at once; the
    # engine calls it on the main process only.
    probe = LandmarkProbe(cfg.probe, cfg.data, method.probe_features)
    if launch.is_main:
        log.info("%s, every %d steps", probe.describe(), cfg.probe.every)
    return probe, dataclasses.replace(cfg.train, eval_every=cfg.probe.every)


if __name__ == "__main__":
    sys.exit(script_main(pretrain, PretrainConfig, __doc__, "ddpm_landmarks.pretrain"))
