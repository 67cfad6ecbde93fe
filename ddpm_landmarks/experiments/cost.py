"""What a grid will cost before it runs: `ddpm-landmarks grid EXPERIMENT --dry-run`.

Per job: training images (optimiser steps x batch x processes x accumulation) times the FLOPs
of one training image (forward + backward, counted by torch's FlopCounterMode on the job's own
network and loss at its resolution), and a time at EFFICIENCY of this machine's matmul peak,
measured now. It counts training steps only (validation and the test evaluation add a few %)
and is an upper bound when early stopping ends a run sooner. The number of landmarks changes
only the head's FLOPs, so networks are counted with data.num_landmarks or 19.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm_landmarks.experiments.grid_config import Cell, Plan, Pretraining

# Share of the matmul peak a training step reaches: the fine-tuning and pretraining
# benchmarks measured 36-56 % on the 2-core CPU (experiments/bench/results_*.md).
EFFICIENCY = 0.4
_DEFAULT_LANDMARKS = 19


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32,
                       n: int = 1024, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in dtype on device (median of reps after 2 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def pretrain_flops_per_image(job: Pretraining) -> float:
    """Forward + backward FLOPs of the method's loss per image (2 images, halved: BatchNorm
    in SSL heads needs more than one)."""
    from ddpm_landmarks.methods import METHODS, SSL_METHODS
    cfg = job.config
    method = METHODS[cfg.method](cfg)
    size = cfg.data.image_size
    image = torch.zeros(2, 1, size, size)
    batch = {"view1": image, "view2": image.clone()} if cfg.method in SSL_METHODS else image

    def step() -> None:
        loss, _ = method.loss(method.model, batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
    return _count(step) / 2


def finetune_flops_per_image(cell: Cell) -> float:
    """Forward + backward FLOPs of the cell's regressor per image. The network is built at
    random init with the same architecture (the pretrained weights may not exist yet)."""
    from ddpm_landmarks.models.regressor import build_regressor
    cfg = cell.config
    model_cfg = cfg.model
    if cell.kind == "ddpm" and cell.pretraining is not None:
        model_cfg = dataclasses.replace(model_cfg, init="scratch", pretrained_path="",
                                        preset=cell.pretraining.config.model.preset)
    elif cell.kind in ("simclr", "moco_v2", "moco_v3", "imagenet"):
        model_cfg = dataclasses.replace(model_cfg, init="scratch", pretrained_path="")
    model = build_regressor(model_cfg, cfg.data.num_landmarks or _DEFAULT_LANDMARKS,
                            cfg.data.image_size)
    size = cfg.data.image_size
    images = torch.zeros(2, 1, size, size)
    return _count(lambda: model(images).square().mean().backward()) / 2


def _images(train_cfg, num_processes: int) -> int:
    return train_cfg.max_steps * train_cfg.batch_size * train_cfg.grad_accum * num_processes


def estimate(plan: Plan, done_cells: set[str], done_pretrainings: set[str],
             device: Optional[torch.device] = None) -> dict:
    """Rows for every pretraining and cell (FLOPs, minutes) and the total of what is not done."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    procs = plan.grid.launcher.num_processes if plan.grid.launcher.kind == "accelerate" else 1
    peak = matmul_peak_gflops(device)
    cache: dict[tuple, float] = {}
    rows, total = [], 0.0

    def add(kind: str, name: str, train_cfg, per_image: float, done: bool, note: str) -> None:
        nonlocal total
        images = _images(train_cfg, procs)
        flops = images * per_image
        minutes = flops / (EFFICIENCY * peak * 1e9) / 60 / procs   # processes run in parallel
        rows.append({"kind": kind, "name": name, "steps": train_cfg.max_steps,
                     "images": images, "gflop_per_image": per_image / 1e9,
                     "tflop": flops / 1e12, "minutes": minutes, "done": done, "note": note})
        if not done:
            total += minutes

    for job in plan.pretrainings:
        cfg = job.config
        key = ("pretrain", cfg.method, cfg.model.preset, cfg.ssl.encoder, cfg.data.image_size)
        if key not in cache:
            cache[key] = pretrain_flops_per_image(job)
        add("pretrain", job.name, cfg.train, cache[key], job.name in done_pretrainings,
            f"{job.method}, shared by {len(job.users)} cells")
    for cell in plan.cells:
        if cell.kind == "mean_shape":
            continue                   # no network: seconds
        m = cell.config.model
        preset = cell.pretraining.config.model.preset if cell.pretraining else m.preset
        key = ("finetune", m.arch, preset, m.encoder, m.gray_adapter, m.head,
               cell.config.data.image_size)
        if key not in cache:
            cache[key] = finetune_flops_per_image(cell)
        add("cell", cell.name, cell.config.train, cache[key], cell.name in done_cells,
            f"pretraining {cell.pretraining.name}" if cell.pretraining else cell.kind)
    return {"rows": rows, "minutes_left": total, "peak_gflops": peak, "device": str(device),
            "efficiency": EFFICIENCY, "processes": procs}


def format_estimate(plan: Plan, est: dict) -> str:
    lines = [f"grid {plan.grid.name}: {len(plan.cells)} cells, {len(plan.pretrainings)} shared "
             f"pretraining(s); folder {plan.grid.grid_dir}", "",
             "| job | name | steps | images | GFLOP/img | TFLOP | est. min | status | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in est["rows"]:
        lines.append(f"| {r['kind']} | {r['name']} | {r['steps']} | {r['images']} | "
                     f"{r['gflop_per_image']:.2f} | {r['tflop']:.2f} | {r['minutes']:.1f} | "
                     f"{'done' if r['done'] else 'to run'} | {r['note']} |")
    lines += ["", f"left to run: ~{est['minutes_left']:.0f} min at {100 * est['efficiency']:.0f}% "
              f"of the measured fp32 matmul peak ({est['peak_gflops']:.0f} GFLOP/s on "
              f"{est['device']}, {est['processes']} process(es) per job); training steps only, "
              f"an upper bound with early stopping"]
    return "\n".join(lines)
