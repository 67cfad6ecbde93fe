"""The one training engine, shared by DDPM pretraining, the SSL baselines and fine-tuning.

    trainer = Trainer(method, train_dataset, cfg.train, cfg.optim, run_dir, to_dict(cfg),
                      log_with="wandb", init_trackers=..., log_images=...,
                      param_groups=None, validate=None)
    summary = trainer.fit()      # {"step", "epoch", "loss", "images_per_s", "best", ...}

Everything is counted in OPTIMISER steps (cfg.max_steps, log/image/checkpoint intervals, the
LR schedule, the EMA); one optimiser step = grad_accum micro-batches on every process.
Resuming (training/checkpoint.py: safetensors + JSON, nothing unpickled) restores weights, EMA,
optimiser, schedule, RNG states and the position in the data: the shuffle order of an epoch
depends only on (seed, epoch), augmentations only on (seed, epoch, item) (data/randomness.py),
and the batches of the interrupted epoch that were already used are skipped, so a resumed run
is bit for bit the run that was interrupted (fp32 on one CPU / GPU).

Non-finite steps: an optimiser step whose loss or gradient norm is not finite (on any process)
is skipped - no update, no schedule or EMA step - and counted (train/nonfinite_skipped); more
than cfg.max_nonfinite_steps in a row stop the run with an error naming the step. With fp16
on a GPU the GradScaler skips overflowing steps itself (its scale backs off); fp16 without a
GPU is refused. A model with a non-finite weight is never checkpointed or exported. A custom `sampler` (data/samplers.EpochSampler) must
keep that property; before each epoch it is told how its positions map to optimiser steps, and
its `scalars(step)` are logged (data/curriculum.py's staged sampler uses both).

Validation (fine-tuning): `validate(model) -> {"val/mre": ..., ...}` runs on the main process
every cfg.eval_every steps and at the end, under the EMA weights when there is an EMA. Its
`monitor` value (lower is better) decides: a new best is exported to run_dir/best; the
"plateau" lr schedule is told; after cfg.early_stopping_patience validations without a new
best, training stops. best/ holds best.json (its step and value); the best value, its step,
the patience count and a snapshot of best/ are part of the checkpoint, so a resumed run keeps
the same best model and the same stopping decision.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ddpm_landmarks.config.training import OptimConfig, TrainConfig
from ddpm_landmarks.data.randomness import set_data_epoch
from ddpm_landmarks.data.samplers import EpochSampler, EpochShuffleSampler
from ddpm_landmarks.errors import NonFiniteError
from ddpm_landmarks.training.checkpoint import (
    BEST_SNAPSHOT,
    CheckpointData,
    explicit_checkpoint,
    latest_readable,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from ddpm_landmarks.training.ema import EMA
from ddpm_landmarks.training.optim import (
    WarmupPlateauFactor,
    build_optimizer,
    build_scheduler,
)
from ddpm_landmarks.utils.atomic import atomic_write_text, fsync_path

log = logging.getLogger(__name__)

ImageLogger = Callable[[Accelerator, dict, int], None]
Validator = Callable[[torch.nn.Module], dict]
BEST_INFO = "best.json"



def _no_image_logging(accelerator: Accelerator, images: dict, step: int) -> None:
    pass


class _WorkerSeeder:
    """worker_init_fn: numpy/random/torch seeds per (seed, epoch, process, worker)."""

    def __init__(self, seed: int, process_index: int, sampler: EpochSampler):
        self.seed, self.process_index, self.sampler = seed, process_index, sampler

    def __call__(self, worker_id: int) -> None:
        # Workers are forked at the start of each epoch, so sampler.epoch is the current one;
        # without it every epoch would replay the same augmentation random streams.
        s = self.seed + self.process_index * 1000 + worker_id + 1_000_003 * self.sampler.epoch
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons (AcceleratorState, GradientState); a fresh job
    in the same process (a grid's inline cell, a test) needs fresh ones, as a new process would
    have, e.g. for another mixed-precision setting."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def config_hash(config_dict: dict) -> str:
    """Short hash of the run config, ignoring train.resume (it changes on every resume)."""
    data = dict(config_dict)
    if isinstance(data.get("train"), dict):
        data["train"] = {k: v for k, v in data["train"].items() if k != "resume"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    def __init__(self, method, train_dataset: Dataset, cfg: TrainConfig, optim_cfg: OptimConfig,
                 run_dir: Path, config_dict: dict, *, log_with=None,
                 init_trackers: Optional[Callable[[Accelerator], None]] = None,
                 log_images: Optional[ImageLogger] = None, shuffle: bool = True,
                 param_groups: Optional[list[dict]] = None,
                 validate: Optional[Validator] = None, monitor: str = "val/mre",
                 sampler: Optional[EpochSampler] = None,
                 resume_from: Optional[CheckpointData] = None):
        self.method, self.cfg, self.optim_cfg, self.run_dir = method, cfg, optim_cfg, Path(run_dir)
        self.validate_fn, self.monitor = validate, monitor
        if cfg.early_stopping_patience and not (validate and cfg.eval_every):
            raise ValueError("train.early_stopping_patience needs validation: set "
                             "train.eval_every > 0 and validation images")
        if getattr(optim_cfg, "schedule", "") == "plateau" and not (validate and cfg.eval_every):
            raise ValueError("optim.schedule=plateau needs validation: set train.eval_every > 0 "
                             "and validation images")
        self.config_dict = config_dict
        self.log_images_fn = log_images or _no_image_logging
        self.history: list[dict] = []      # what was logged (main process), for tests / summaries

        # ------------------------------------------------------------------ accelerator
        # The scheduler is stepped by hand once per optimiser step; accelerate's default would
        # step it num_processes times per optimiser step.
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.mixed_precision=fp16 needs a CUDA GPU (a GradScaler keeps its "
                             "gradients finite); on a CPU use bf16 or no")
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
            log_with=log_with, project_dir=str(self.run_dir), step_scheduler_with_optimizer=False)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if init_trackers is not None:
            init_trackers(acc)

        # ------------------------------------------------------------------ model, optimiser
        model = method.model
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            model.compile()                # in place: state_dict keys stay unprefixed
        optimizer = build_optimizer(model, optim_cfg, param_groups)
        scheduler = build_scheduler(optimizer, optim_cfg, total_steps=cfg.max_steps)

        # ------------------------------------------------------------------ data
        # A custom sampler must, like EpochShuffleSampler, give an order that depends only on
        # its seed and set_epoch (resume skips the batches already used).
        self.train_dataset = train_dataset
        self.sampler = sampler if sampler is not None else EpochShuffleSampler(
            len(train_dataset), cfg.seed, shuffle=shuffle)
        loader = DataLoader(
            train_dataset, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
            worker_init_fn=_WorkerSeeder(cfg.seed, acc.process_index, self.sampler),
            # Own generator: creating a loader iterator then draws from it, not from the global
            # RNG, so the extra iterator after a resume does not shift the global streams.
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False)

        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(
            model, optimizer, loader, scheduler)
        if len(self.loader) == 0:
            raise ValueError(f"dataset of {len(train_dataset)} images gives no full batch of "
                             f"{cfg.batch_size} per process on {acc.num_processes} processes")
        if len(self.loader) % cfg.grad_accum:
            log.warning("%d batches per epoch is not a multiple of grad_accum=%d: accelerate "
                        "steps early at each epoch end", len(self.loader), cfg.grad_accum)

        # ------------------------------------------------------------------ EMA
        self.params = list(acc.unwrap_model(self.model).parameters())
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None

        # ------------------------------------------------------------------ state
        self.step = 0             # optimiser steps
        self.micro_step = 0       # micro-batches on this process
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of self.epoch already consumed
        self.loss_generator = torch.Generator(device=acc.device)
        self._last_saved = -1     # step of the newest checkpoint of this run
        self.best_value, self.best_step, self.bad_evals = math.inf, -1, 0
        self.stopped_early = False
        self.nonfinite_skipped, self.nonfinite_in_a_row = 0, 0
        if resume_from is None and cfg.resume:
            # The scripts read (and check) the checkpoint before building anything
            # (training/run_folder.py); the engine used on its own reads it here.
            resume_from = (latest_readable(self.run_dir, acc.process_index, cfg.ema)
                           if cfg.resume == "latest" else
                           read_checkpoint(explicit_checkpoint(self.run_dir, cfg.resume),
                                           acc.process_index, cfg.ema))
        if resume_from is not None:
            self._resume(resume_from)

    # ---------------------------------------------------------------------- helpers
    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _resume(self, data: CheckpointData) -> None:
        """Apply a checkpoint read by training/checkpoint.read_checkpoint."""
        acc, state = self.accelerator, data.state
        self._unwrapped().load_state_dict(data.model, strict=True)
        self.optimizer.load_state_dict(data.optimizer)
        self.scheduler.load_state_dict(data.scheduler)
        if self.ema is not None:
            self.ema.load_state(*data.ema)
            self.ema.to(acc.device)
        if data.scaler is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(data.scaler)
        if data.rng is not None:
            set_rng_state(data.rng["tensors"], data.rng["meta"])
        if (state.get("num_processes"), state.get("batch_size")) != (acc.num_processes,
                                                                     self.cfg.batch_size):
            log.warning("resuming with another process count or batch size: the data position "
                        "of the interrupted epoch and the random states are only approximate")
        self.step, self.micro_step = state["step"], state["micro_step"]
        self._last_saved = self.step
        self.best_value = state.get("best_value", math.inf)
        self.best_step, self.bad_evals = state.get("best_step", -1), state.get("bad_evals", 0)
        self.stopped_early = state.get("stopped_early", False)
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        if self.batches_in_epoch >= len(self.loader):      # saved on the epoch's last batch
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        log.info("resumed from %s at step %d (epoch %d, batch %d)", data.path, self.step,
                 self.epoch, self.batches_in_epoch)

    def _check_finite_weights(self, what: str) -> None:
        bad = [n for n, p in self._unwrapped().named_parameters() if not torch.isfinite(p).all()]
        if self.ema is not None and not self.ema.all_finite():
            bad.append("the EMA")
        if bad:
            raise NonFiniteError(f"step {self.step}: non-finite weights ({', '.join(bad[:3])}); "
                                 f"the {what} is not written, the last checkpoint stays the "
                                 f"newest")

    def _save(self) -> None:
        self._check_finite_weights("checkpoint")
        state = {"micro_step": self.micro_step, "epoch": self.epoch,
                 "batches_in_epoch": self.batches_in_epoch,
                 "config_hash": config_hash(self.config_dict), "config": self.config_dict,
                 "num_processes": self.accelerator.num_processes,
                 "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                 "best_value": self.best_value, "best_step": self.best_step,
                 "bad_evals": self.bad_evals, "stopped_early": self.stopped_early,
                 "nonfinite_skipped": self.nonfinite_skipped,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row}
        save_checkpoint(self.accelerator, self.run_dir, self.step, model=self._unwrapped(),
                        optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                        trainer_state=state, keep=self.cfg.keep_checkpoints)
        self._last_saved = self.step

    def _reseed_loss_generator(self) -> None:
        # A pure function of (seed, micro-step): the method's noise is identical after a
        # resume without storing generator states.
        # The same state on every process: methods draw for the global batch and take their
        # slice (methods.base.this_process_slice), so N processes reproduce 1 process.
        seed = self.cfg.seed * 1_000_003 + self.micro_step
        self.loss_generator.manual_seed(seed % 2**63)

    def _images_batch(self):
        """A fixed batch (first items of the dataset) for reconstruction-type image logs."""
        dataset = self.loader.dataset
        items = [dataset[i] for i in range(min(self.cfg.batch_size, len(dataset)))]
        return send_to_device(default_collate(items), self.accelerator.device)

    def _with_eval_weights(self, fn: Callable[[torch.nn.Module], object]):
        """fn(model) under the EMA weights in eval mode, global RNG untouched; weights restored."""
        model = self._unwrapped()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        swap = self.ema.swapped_in(self.params) if self.ema is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), swap:
            model.eval()
            try:
                with torch.no_grad():
                    return fn(model)
            finally:
                model.train()

    def _log_images(self) -> None:
        """Method's image grids under the EMA weights, main process only."""
        images = self._with_eval_weights(
            lambda model: self.method.log_images(model, self._images_batch()))
        self.log_images_fn(self.accelerator, images, self.step)

    def _validate(self) -> dict:
        """Validation on the main process (collective: every process must call it together).
        Returns the values logged; exports a new best; decides early stopping."""
        acc = self.accelerator
        payload = [None]
        if acc.is_main_process:
            values = self._with_eval_weights(self.validate_fn)
            value = float(values[self.monitor])
            improved = value < self.best_value
            if improved:
                self.best_value, self.best_step, self.bad_evals = value, self.step, 0
                self._export_best(value)
            else:
                self.bad_evals += 1
            payload = [(values, self.best_value, self.best_step, self.bad_evals)]
        broadcast_object_list(payload, from_process=0)
        values, self.best_value, self.best_step, self.bad_evals = payload[0]
        lr_fn = getattr(self.scheduler, "scheduler", self.scheduler).lr_lambdas[0]
        if isinstance(lr_fn, WarmupPlateauFactor):       # the "plateau" schedule
            lr_fn.report(float(values[self.monitor]))
        patience = self.cfg.early_stopping_patience
        if patience and self.bad_evals >= patience:
            self.stopped_early = True
            log.info("early stopping at step %d: no better %s than %.4f (step %d) for %d "
                     "validations", self.step, self.monitor, self.best_value, self.best_step,
                     patience)
        values = {**values, f"{self.monitor}_best": self.best_value}
        acc.log(values, step=self.step)
        if acc.is_main_process:
            self.history.append({"step": self.step, **values})
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, **values}) + "\n")
        return values

    def _export(self) -> None:
        self._check_finite_weights("export")
        self._with_eval_weights(
            lambda model: self.method.export(model, self.run_dir / "export", self.config_dict))

    def _export_best(self, value: float) -> None:
        """best/ = the method's export + best.json (step, value), swapped in as a whole: best/
        is at any moment the previous best, the new one, or (between two renames) absent."""
        self._check_finite_weights("best model")
        best, new, old = (self.run_dir / BEST_SNAPSHOT, self.run_dir / ".best-new",
                          self.run_dir / ".best-old")
        for stale in (new, old):
            shutil.rmtree(stale, ignore_errors=True)
        self._with_eval_weights(lambda model: self.method.export(model, new, self.config_dict))
        atomic_write_text(new / BEST_INFO, json.dumps(
            {"step": self.step, "value": value, "monitor": self.monitor}) + "\n")
        if best.exists():
            os.replace(best, old)
        os.replace(new, best)
        fsync_path(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _optimizer_step(self, window_bad: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Step (True) unless this step's loss or gradient norm is non-finite on any process;
        a skipped step changes nothing but the counters (module doc)."""
        acc = self.accelerator
        bad = window_bad.float()
        if acc.scaler is None:            # fp16's GradScaler handles overflowing gradients
            bad = bad + (~torch.isfinite(grad_norm.float())).float()
        if float(acc.reduce(bad, reduction="sum")) == 0:
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite loss or gradient norm, optimiser step skipped (%d in a "
                    "row, %d in all)", self.step + 1, self.nonfinite_in_a_row,
                    self.nonfinite_skipped)
        if self.nonfinite_in_a_row > self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {self.step + 1}: {self.nonfinite_in_a_row} optimiser steps in a row had a "
                f"non-finite loss or gradient norm (train.max_nonfinite_steps="
                f"{self.cfg.max_nonfinite_steps}); lower the learning rate or check the data. "
                f"The newest checkpoint holds finite weights")
        return False

    # ---------------------------------------------------------------------- training loop
    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        images_per_step = cfg.batch_size * acc.num_processes * cfg.grad_accum
        max_norm = math.inf if self.optim_cfg.max_grad_norm is None else self.optim_cfg.max_grad_norm
        start_step, t_start = self.step, time.perf_counter()
        t_log, step_log = t_start, self.step
        loss_sum = torch.zeros((), device=acc.device)
        loss_count = torch.zeros((), device=acc.device)
        logs_sum, logs_count = {}, 0
        grad_norm, last_loss = None, float("nan")
        window_bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train",
                   disable=not acc.is_local_main_process)

        while self.step < cfg.max_steps and not self.stopped_early:
            # -------------------------------------------------------------- epoch start
            self.sampler.set_epoch(self.epoch)
            # A step-aware sampler (data/curriculum.py) maps each position of the epoch to the
            # optimiser step it trains in: steps done before the epoch's first batch (mid-epoch
            # after a resume: minus the batches skipped below) and the layout.
            self.sampler.set_step_layout(
                steps_before=self.step - math.ceil(self.batches_in_epoch / cfg.grad_accum),
                batch_size=cfg.batch_size, num_processes=acc.num_processes,
                grad_accum=cfg.grad_accum)
            set_data_epoch(self.train_dataset, self.epoch)   # per-item augmentation streams
            self.loader.set_epoch(self.epoch)      # accelerate re-applies its own counter
            loader = self.loader
            if self.batches_in_epoch:
                loader = acc.skip_first_batches(self.loader, self.batches_in_epoch)
                loader.set_epoch(self.epoch)

            for batch in loader:
                # ---------------------------------------------------------- micro-step
                if cfg.channels_last and isinstance(batch, torch.Tensor) and batch.ndim == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with acc.accumulate(self.model):
                    self._reseed_loss_generator()
                    with acc.autocast():
                        loss, logs = self.method.loss(self.model, batch,
                                                      generator=self.loss_generator)
                    acc.backward(loss)
                    loss = loss.detach().float()
                    window_bad = window_bad | ~torch.isfinite(loss)
                    stepped = False
                    if acc.sync_gradients:
                        # Pre-clip norm; max_norm=inf only measures (and unscales fp16 grads).
                        clip_norm = max_norm if self.optim_cfg.clip_mode == "norm" else math.inf
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip_norm)
                        if self.optim_cfg.clip_mode == "value" and math.isfinite(max_norm):
                            acc.clip_grad_value_(self.model.parameters(), max_norm)
                        stepped = self._optimizer_step(window_bad, grad_norm)
                        window_bad = torch.zeros((), dtype=torch.bool, device=acc.device)
                    self.optimizer.zero_grad(set_to_none=True)
                self.micro_step += 1
                self.batches_in_epoch += 1
                finite = torch.isfinite(loss)       # a tensor: no device sync per micro-step
                loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
                loss_count += finite.float()
                logs_count += 1
                for key, value in logs.items():
                    logs_sum[key] = logs_sum.get(key, 0.0) + float(value)
                if not acc.sync_gradients or not stepped:
                    continue

                # ---------------------------------------------------------- optimiser step
                self.step += 1
                if self.ema is not None:
                    self.ema.step(self.params)
                bar.update(1)

                at_end = self.step == cfg.max_steps
                if at_end or (cfg.log_every > 0 and self.step % cfg.log_every == 0):
                    # Collective: every process reaches this on the same step.
                    mean_loss = acc.reduce(loss_sum / loss_count.clamp(min=1), reduction="mean")
                    last_loss = float(mean_loss)
                    now = time.perf_counter()
                    values = {"train/loss": last_loss,
                              "train/lr": self.scheduler.get_last_lr()[0],
                              "train/grad_norm": float("nan") if grad_norm is None
                              else float(grad_norm),
                              "train/images_per_s": (self.step - step_log) * images_per_step
                              / max(now - t_log, 1e-9),
                              "train/peak_memory_mb": peak_memory_mb(),
                              "train/epoch": self.epoch,
                              "train/nonfinite_skipped": self.nonfinite_skipped}
                    # The method's own scalars, from the main process only; they never replace
                    # the engine's cross-process values (e.g. its "loss" vs the averaged one).
                    values.update({f"train/{k}": v / max(logs_count, 1)
                                   for k, v in logs_sum.items() if f"train/{k}" not in values})
                    if self.ema is not None:
                        values["train/ema_decay"] = self.ema.current_decay()
                    values.update(self.sampler.scalars(self.step))   # e.g. the curriculum stage
                    acc.log(values, step=self.step)
                    if acc.is_main_process:
                        self.history.append({"step": self.step, **values})
                        # A local copy of what the trackers got, readable without W&B.
                        with open(self.run_dir / "metrics.jsonl", "a") as fh:
                            fh.write(json.dumps({"step": self.step, **values}) + "\n")
                    bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{values['train/lr']:.2e}")
                    loss_sum.zero_()
                    loss_count.zero_()
                    logs_sum, logs_count, t_log, step_log = {}, 0, now, self.step

                if cfg.image_every and self.step % cfg.image_every == 0 and acc.is_main_process:
                    self._log_images()
                if self.validate_fn is not None and cfg.eval_every and (
                        self.step % cfg.eval_every == 0 or at_end):
                    self._validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._save()
                if self.step >= cfg.max_steps or self.stopped_early:
                    break
            else:
                # ---------------------------------------------------------- epoch end
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0

        # ------------------------------------------------------------------ the end
        bar.close()
        elapsed = time.perf_counter() - t_start
        if self._last_saved != self.step:
            self._save()
        if acc.is_main_process:
            self._export()
        acc.wait_for_everyone()
        acc.end_training()
        return {"step": self.step, "epoch": self.epoch, "loss": last_loss,
                "images_per_s": (self.step - start_step) * images_per_step / max(elapsed, 1e-9),
                "best": self.best_value, "best_step": self.best_step,
                "stopped_early": self.stopped_early}


def train(method, train_dataset: Dataset, cfg: TrainConfig, optim_cfg: OptimConfig,
          run_dir: Path, config_dict: dict, **kwargs) -> dict:
    """Functional entry point: Trainer(...).fit()."""
    return Trainer(method, train_dataset, cfg, optim_cfg, run_dir, config_dict, **kwargs).fit()
