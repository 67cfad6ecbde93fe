"""Fine-tune a pretrained DDPM U-Net (or the same U-Net from scratch) as a landmark heatmap
regressor with few labelled images.

One process:
    ddpm-landmarks finetune configs/finetune/synthetic.yaml model.pretrained_path=runs/demo_pretrain/export
Several processes / GPUs (same flags, same config):
    accelerate launch -m ddpm_landmarks.finetune --config configs/finetune/isbi2015.yaml train.resume=latest

The run folder (run.output_dir/run.name) receives config.yaml, the few-shot split
(split_train_ids.txt, split_val_ids.txt, split.json), metrics.jsonl (loss and validation MRE),
checkpoints/step_*/ (resumable), best/ (the regressor at the best validation MRE) and export/
(the regressor at the last step). `ddpm-landmarks evaluate RUN` scores best/ (else export/).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from accelerate.utils import set_seed
from safetensors import safe_open
from torch.utils.data import Dataset

from ddpm_landmarks.config import ConfigError, load_config, save_config, to_dict
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.data.sample import DataError
from ddpm_landmarks.data.splits import make_fewshot_split, save_split
from ddpm_landmarks.evaluation.decoders import never_abstain
from ddpm_landmarks.evaluation.evaluate import GroundTruth, evaluate_predictions
from ddpm_landmarks.evaluation.inference import HeatmapPredictor, predict_dataset
from ddpm_landmarks.methods.heatmap_regression import HeatmapRegressionMethod
from ddpm_landmarks.models.regressor import build_regressor, param_groups
from ddpm_landmarks.training.checkpoint import resolve_resume
from ddpm_landmarks.training.engine import Trainer
from ddpm_landmarks.training.finetune_config import FinetuneConfig
from ddpm_landmarks.training.trackers import flatten_config, log_image_grids, tracker_setup
from ddpm_landmarks.utils.runs import setup_logging

log = logging.getLogger(__name__)


class RepeatedDataset(Dataset):
    """The N labelled images repeated `times` times per epoch (each copy augmented anew), so
    that N = 1..10 still fills full batches on every process."""

    def __init__(self, dataset: Dataset, times: int):
        self.dataset, self.times = dataset, max(1, int(times))

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def make_validator(val_data: HeatmapDataset, cfg: FinetuneConfig):
    """validate(model) -> {"val/mre", "val/sd", "val/sdr@t"..., "val/missed"} in the dataset's
    unit. Decoded without abstaining (decoders.never_abstain: every channel with location
    information gets a position, whatever its peak), so a model cannot improve its validation
    MRE by abstaining on hard landmarks; val/missed counts the rest (all-NaN or constant)."""
    decoder = never_abstain(cfg.decoder)
    truths = [GroundTruth.of(s) for s in val_data.dataset]

    def validate(model) -> dict:
        predictor = HeatmapPredictor(model, cfg.loss, cfg.heatmap, decoder,
                                     val_data.dataset.flip_permutation, flip_tta=False)
        indices, points, _ = predict_dataset(predictor, val_data, cfg.eval.batch_size)
        assert indices == list(range(len(truths)))
        summary = evaluate_predictions(val_data.dataset, truths, points, cfg.eval)
        values = {"val/mre": summary["mre"], "val/sd": summary["sd"],
                  "val/missed": summary["missed"]}
        values.update({f"val/sdr@{t:g}": v for t, v in summary["sdr"].items()})
        return values

    return validate


def check_checkpoint_landmarks(ckpt: Path, num_landmarks: int) -> None:
    """A clear error when a checkpoint's head predicts another number of landmarks."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as fh:
        # conv1x1 head: unet.conv_out.bias; small head: unet.conv_out.{0,1,3}.bias (last = 3);
        # smp baselines: net.segmentation_head.0.bias.
        heads = sorted(k for k in fh.keys() if k.startswith(("unet.conv_out.",
                                                              "net.segmentation_head.")) and
                       k.endswith("bias"))
        if not heads:
            raise ConfigError(f"{ckpt} is not a fine-tuning checkpoint (no heatmap head)")
        found = fh.get_slice(heads[-1]).get_shape()[0]
    if found != num_landmarks:
        raise ConfigError(f"checkpoint {ckpt} predicts {found} landmarks but this run's data has "
                          f"{num_landmarks}; resume only runs of the same dataset "
                          f"(or start a new run.name)")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) one fine-tuning job; returns the engine's summary."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    main = rank == 0
    setup_logging(None)

    # ------------------------------------------------------------------ data
    dataset = build_dataset(cfg.data)
    pool = dataset.split(cfg.data.train_split)
    try:
        split = make_fewshot_split(pool.ids, cfg.fewshot)
    except ValueError as err:
        raise ConfigError(f"fewshot: {err}") from None
    train_data = HeatmapDataset(pool.subset(split.train_ids), cfg.data, cfg.augment, cfg.heatmap,
                                train=True, seed=cfg.train.seed + 7919 * rank)
    per_step = cfg.train.batch_size * world
    train_set = RepeatedDataset(train_data, math.ceil(per_step / len(train_data)))
    val_data = None
    if split.val_ids:
        val_data = HeatmapDataset(pool.subset(split.val_ids), cfg.data, cfg.augment, cfg.heatmap,
                                  train=False)
    elif cfg.train.eval_every:
        log.warning("no validation images (fewshot.val_policy=%s): no validation, no best/ "
                    "model, no early stopping", cfg.fewshot.val_policy)

    # ------------------------------------------------------------------ model
    set_seed(cfg.train.seed)           # identical initial head on every process
    try:
        model = build_regressor(cfg.model, dataset.num_landmarks, cfg.data.image_size)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from None
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    groups = param_groups(model, body_lr=cfg.optim.lr, head_lr=head_lr,
                          weight_decay=cfg.optim.weight_decay)
    method = HeatmapRegressionMethod(model, cfg.loss, cfg.heatmap)
    ckpt = resolve_resume(run_dir, cfg.train.resume)
    if ckpt is not None:
        check_checkpoint_landmarks(ckpt, dataset.num_landmarks)

    # ------------------------------------------------------------------ run folder
    # Only now, with data, split and model checked: a refused run leaves the folder untouched.
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_split(split, run_dir)
    setup_logging(run_dir if main else None)
    log.info("few-shot split: %s", split.policy)

    # ------------------------------------------------------------------ train
    config_dict = to_dict(cfg)
    log_with, init_kwargs = tracker_setup(cfg.logger, run_dir, run_name=cfg.run.name)

    def init_trackers(accelerator) -> None:
        if log_with is not None:
            accelerator.init_trackers(cfg.logger.project, config=flatten_config(config_dict),
                                      init_kwargs=init_kwargs)

    validate = make_validator(val_data, cfg) if val_data is not None else None
    try:
        trainer = Trainer(method, train_set, cfg.train, cfg.optim, run_dir, config_dict,
                          log_with=log_with, init_trackers=init_trackers,
                          log_images=log_image_grids, param_groups=groups,
                          validate=validate if cfg.train.eval_every else None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    summary = trainer.fit()
    if main:
        best = summary["best"]
        log.info("done: step %d, loss %.4f%s; models in %s", summary["step"], summary["loss"],
                 f", best val MRE {best:.3f} at step {summary['best_step']}"
                 if np.isfinite(best) else "", run_dir)
    return summary


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m ddpm_landmarks.finetune", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fewshot.budget=10")
    return parser


def run_from_args(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides, cls=FinetuneConfig)
    finetune(cfg)
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
