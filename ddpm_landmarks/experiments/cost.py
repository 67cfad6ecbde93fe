"""What a grid will cost before it runs: `ddpm-landmarks grid EXPERIMENT --dry-run`.

Per job (pretraining, source fine-tuning, cell): training images (optimiser steps x batch x
processes x accumulation), the FLOPs of one training image (forward + backward of the job's own
network and loss at its resolution, counted by torch's FlopCounterMode) and a time from a
measurement, not an assumed efficiency:
a few forward + backward steps of that network (random init, same architecture; the pretrained
weights may not exist yet) are timed on this machine at the job's own batch size, under its
mixed precision. The FLOP rate this gives is printed as a share of this machine's matmul peak
(measured too). Training steps only: validation and the test evaluation add a few %, data
loading is not timed, and early stopping ends runs sooner. Networks are counted with
data.num_landmarks or 19 landmarks (only the head depends on it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm_landmarks.experiments.grid_plan import Cell, Plan, RefineJob
from ddpm_landmarks.experiments.shared_jobs import Pretraining, SourceJob

PROFILE_STEPS = 2          # timed steps at the job's batch size, after one (counted) warm-up
_DEFAULT_LANDMARKS = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32,
                       n: int = 1024, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in dtype on device (median of reps after 2 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16"
                          else torch.float16)


def profile_step(step: Callable[[], None], device: torch.device, precision: str
                 ) -> tuple[float, float]:
    """(FLOPs, seconds) of one call of `step` (forward + backward of one batch)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()                                     # also the warm-up
    times = []
    for _ in range(PROFILE_STEPS):
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, precision):
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(counter.get_total_flops()), min(times)


def pretrain_step(job: Pretraining, device: torch.device, batch_size: int
                  ) -> Callable[[], None]:
    """Forward + backward of the method's own loss on one batch."""
    from ddpm_landmarks.methods.registry import PRETRAINING_METHODS, SSL_METHODS
    cfg = job.config
    method = PRETRAINING_METHODS[cfg.method](cfg)
    model = method.model.to(device)
    size = cfg.data.image_size
    image = torch.zeros(batch_size, 1, size, size, device=device)
    batch = {"view1": image, "view2": image.clone()} if cfg.method in SSL_METHODS else image
    generator = torch.Generator(device=device)

    def step() -> None:
        loss, _ = method.loss(model, batch, generator=generator.manual_seed(0))
        loss.backward()
    return step


def body_preset(job: Cell | SourceJob) -> str:
    """The DDPM U-Net preset of the weights a fine-tuning job starts from: its pretraining's,
    its source job's (recursively), else its own config's."""
    if job.pretraining is not None:
        return job.pretraining.config.model.preset
    if job.source is not None:
        return body_preset(job.source)
    return job.config.model.preset


def finetune_step(job: Cell | SourceJob, device: torch.device, batch_size: int
                  ) -> Callable[[], None]:
    """Forward + backward of the regressor of a cell or source job on one batch."""
    from ddpm_landmarks.models.registry import build_regressor
    cfg = job.config
    model_cfg = cfg.model
    if job.dependencies or model_cfg.init == "imagenet":
        # Weights that may not exist yet (or need a download): the same network at random init.
        model_cfg = dataclasses.replace(model_cfg, init="scratch", pretrained_path="",
                                        preset=body_preset(job))
    model = build_regressor(model_cfg, cfg.data.num_landmarks or _DEFAULT_LANDMARKS,
                            cfg.data.image_size).to(device).train()
    size = cfg.data.image_size
    images = torch.zeros(batch_size, 1, size, size, device=device)
    return lambda: model(images).float().square().mean().backward()


def refine_step(job: RefineJob, device: torch.device, batch_size: int) -> Callable[[], None]:
    """Forward + backward of a refinement run's local network on one batch of patches."""
    from ddpm_landmarks.models.registry import build_regressor
    cfg = job.config
    k = cfg.data.num_landmarks or _DEFAULT_LANDMARKS
    embedding = cfg.refine.landmark_input == "embedding"
    preset = job.pretraining.config.model.preset if job.pretraining else cfg.model.preset
    model_cfg = dataclasses.replace(cfg.model, init="scratch", pretrained_path="", preset=preset,
                                    landmark_embedding=k if embedding else 0)
    size = cfg.refine.patch_size
    model = build_regressor(model_cfg, 1 if embedding else k, size).to(device).train()
    images = torch.zeros(batch_size, 1, size, size, device=device)
    landmarks = torch.zeros(batch_size, dtype=torch.long, device=device) if embedding else None
    return lambda: model(images, landmarks).float().square().mean().backward()


def _images(train_cfg, num_processes: int) -> int:
    return train_cfg.max_steps * train_cfg.batch_size * train_cfg.grad_accum * num_processes


def estimate(plan: Plan, done_cells: set[str], done_pretrainings: set[str],
             device: Optional[torch.device] = None,
             done_sources: frozenset[str] | set[str] = frozenset()) -> dict:
    """Rows for every pretraining, source fine-tuning and cell (FLOPs, measured rate, minutes)
    and the total of what is not done yet."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    procs = plan.grid.launcher.num_processes if plan.grid.launcher.kind == "accelerate" else 1
    peaks: dict[str, float] = {}
    profiles: dict[tuple, tuple[float, float]] = {}
    rows, total = [], 0.0

    def add(kind: str, name: str, train_cfg, key: tuple, make_step, done: bool,
            note: str) -> None:
        nonlocal total
        precision = train_cfg.mixed_precision
        if precision not in peaks:
            peaks[precision] = matmul_peak_gflops(device, {"no": torch.float32,
                                                           "bf16": torch.bfloat16,
                                                           "fp16": torch.float16}[precision])
        batch = train_cfg.batch_size
        if key + (precision, batch) not in profiles:
            profiles[key + (precision, batch)] = profile_step(make_step(batch), device, precision)
        flops, seconds = profiles[key + (precision, batch)]
        images = _images(train_cfg, procs)
        minutes = images * seconds / batch / 60 / procs   # processes run in parallel
        rows.append({"kind": kind, "name": name, "steps": train_cfg.max_steps,
                     "images": images, "precision": precision,
                     "gflop_per_image": flops / batch / 1e9,
                     "tflop": images * flops / batch / 1e12,
                     "peak_share": flops / seconds / 1e9 / peaks[precision],
                     "minutes": minutes, "done": done, "note": note})
        if not done:
            total += minutes

    for job in plan.pretrainings:
        cfg = job.config
        key = ("pretrain", cfg.method, cfg.model.preset, cfg.ssl.encoder, cfg.ssl.in_channels,
               cfg.data.image_size)
        add("pretrain", job.name, cfg.train, key, lambda b: pretrain_step(job, device, b),
            job.name in done_pretrainings, f"{job.method}, shared by {len(job.users)} cells")
    def finetune_key(job: Cell | SourceJob) -> tuple:
        m = job.config.model
        # An existing checkpoint's network is the one saved with it, not the config's preset.
        saved = m.pretrained_path if (m.init in ("pretrained", "regressor") and not
                                      job.dependencies) else ""
        return ("finetune", m.arch, body_preset(job), m.encoder, m.gray_adapter, m.head,
                job.config.data.image_size, job.config.data.num_landmarks, saved)

    for src in plan.sources:
        add("source", src.name, src.config.train, finetune_key(src),
            lambda b: finetune_step(src, device, b), src.name in done_sources,
            f"{src.config.data.dataset} labels, shared by {len(src.users)} jobs")
    for cell in plan.cells:
        if cell.kind == "mean_shape":
            continue                   # no network: seconds
        note = (f"pretraining {cell.pretraining.name}" if cell.pretraining else
                f"source {cell.source.name}" if cell.source else cell.kind)
        add("cell", cell.name, cell.config.train, finetune_key(cell),
            lambda b: finetune_step(cell, device, b), cell.name in done_cells, note)
        if cell.refine is not None:
            r = cell.refine.config
            key = ("refine", r.model.arch, r.model.preset, r.refine.patch_size,
                   r.refine.landmark_input, cell.refine.pretraining is not None)
            add("refine", f"{cell.name}:refine", r.train, key,
                lambda b: refine_step(cell.refine, device, b), cell.name in done_cells,
                f"{r.refine.patch_size} px patches, {r.model.preset}")
    return {"rows": rows, "minutes_left": total, "peak_gflops": peaks, "device": str(device),
            "processes": procs}


def format_estimate(plan: Plan, est: dict) -> str:
    lines = [f"grid {plan.grid.name}: {len(plan.cells)} cells, {len(plan.pretrainings)} shared "
             f"pretraining(s), {len(plan.sources)} shared source fine-tuning(s); folder "
             f"{plan.grid.grid_dir}", "",
             "| job | name | steps | images | precision | GFLOP/img | TFLOP | % of peak "
             "| est. min | status | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in est["rows"]:
        lines.append(f"| {r['kind']} | {r['name']} | {r['steps']} | {r['images']} | "
                     f"{'fp32' if r['precision'] == 'no' else r['precision']} | "
                     f"{r['gflop_per_image']:.2f} | {r['tflop']:.2f} | "
                     f"{100 * r['peak_share']:.0f} | {r['minutes']:.1f} | "
                     f"{'done' if r['done'] else 'to run'} | {r['note']} |")
    peaks = ", ".join(f"{'fp32' if k == 'no' else k} {v:.0f}"
                      for k, v in est["peak_gflops"].items())
    lines += ["", f"left to run: ~{est['minutes_left']:.0f} min of training steps, from "
              f"{PROFILE_STEPS} timed steps per network at the jobs' batch sizes on "
              f"{est['device']} ({est['processes']} process(es) per job; matmul peak measured "
              f"now: {peaks} GFLOP/s); data loading, validation and evaluation not included"]
    return "\n".join(lines)
