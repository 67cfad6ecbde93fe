"""What a grid will cost before it runs: `ddpm-landmarks grid EXPERIMENT --dry-run`.

Per job (pretraining, source fine-tuning, cell):
- training images: optimiser steps x batch x processes x accumulation. A fine-tuning counted in
  epochs (epochs.max) is resolved for its N (config/finetune.py resolve_epochs; N = all: the
  size of its training split, read from the data when they are there, else the released
  split's size): an upper bound, since early stopping ends runs sooner.
- FLOPs of one training image: forward + backward of the job's own network and loss at its
  resolution, counted by torch's FlopCounterMode on the meta device: no weights, no memory,
  seconds even for the 558 M-parameter released U-Net at 256 px (a loss's `.item()` for its
  logs reads 0 there).
- GPU hours: images x FLOPs / (peak x efficiency), both assumptions printed with the table and
  set in the experiment file's `cost:` section (grid_schema.CostConfig).
- minutes here: a few forward + backward steps of the network timed on this machine at the
  job's batch size and precision (the share of this machine's matmul peak, measured on the
  spot, is printed), when one step should take at most cost.max_timed_step_s at that peak;
  larger networks are not run here (a 256 px U-Net step takes minutes and gigabytes on 2 CPU
  cores) and show "-".
Training steps only: validation and the test evaluation add a few %, data loading is not timed.
Networks are counted with data.num_landmarks or 19 landmarks (only the head depends on it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm_landmarks.config.finetune import resolve_epochs
from ddpm_landmarks.errors import DataError
from ddpm_landmarks.experiments.grid_plan import Cell, Plan, RefineJob
from ddpm_landmarks.experiments.shared_jobs import Pretraining, SourceJob

PROFILE_STEPS = 2          # timed steps at the job's batch size, after one warm-up
_DEFAULT_LANDMARKS = 19
META = torch.device("meta")


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


@contextlib.contextmanager
def _zero_items() -> Iterator[None]:
    """Tensor.item() of a meta tensor reads 0.0 (the losses' logs) instead of failing."""
    item = torch.Tensor.item

    def meta_item(self):
        return 0.0 if self.is_meta else item(self)
    torch.Tensor.item = meta_item
    try:
        yield
    finally:
        torch.Tensor.item = item


def count_flops(make_step: Callable[[torch.device], Callable[[], None]]) -> float:
    """FLOPs of one call of the step make_step builds, built and run on the meta device."""
    with torch.device(META):
        step = make_step(META)
    counter = FlopCounterMode(display=False)
    with _zero_items(), counter:
        step()
    return float(counter.get_total_flops())


def time_step(step: Callable[[], None], device: torch.device, precision: str) -> float:
    """Seconds of one call of `step` (the fastest of PROFILE_STEPS, after one warm-up)."""
    step()
    times = []
    for _ in range(PROFILE_STEPS):
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, precision):
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def pretrain_step(job: Pretraining, device: torch.device, batch_size: int
                  ) -> Callable[[], None]:
    """Forward + backward of the method's own loss on one batch of its own views."""
    from ddpm_landmarks.methods.registry import PRETRAINING_METHODS, SSL_METHODS
    cfg = job.config
    method = PRETRAINING_METHODS[cfg.method](cfg)
    model = method.model.to(device)
    size, views = cfg.data.image_size, cfg.ssl.views
    if cfg.method in SSL_METHODS:
        side = views.global_size or size
        image = torch.zeros(batch_size, 1, side, side, device=device)
        batch = {"view1": image, "view2": image.clone()}
        if views.local_crops:
            batch["local"] = torch.zeros(batch_size, views.local_crops, 1, views.local_size,
                                         views.local_size, device=device)
    else:
        batch = torch.zeros(batch_size, 1, size, size, device=device)
    # The meta device has no generator: the method then draws without one.
    generator = None if device.type == "meta" else torch.Generator(device=device)

    def step() -> None:
        if generator is not None:
            generator.manual_seed(0)
        loss, _ = method.loss(model, batch, generator=generator)
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
    if job.dependencies or model_cfg.init in ("imagenet", "released_ddpm", "released_ssl") or (
            model_cfg.init == "pretrained" and not model_cfg.pretrained_path):
        # Weights that may not exist yet (or need a download): the same network at random init.
        model_cfg = dataclasses.replace(model_cfg, init="scratch", pretrained_path="",
                                        preset=body_preset(job))
    model = build_regressor(model_cfg, cfg.data.num_landmarks or _DEFAULT_LANDMARKS,
                            cfg.data.image_size).to(device).train()
    size = cfg.data.image_size
    images = torch.zeros(batch_size, 1, size, size, device=device)
    return lambda: model(images).float().square().mean().backward()


_POOLS: dict[tuple, Optional[int]] = {}


def pool_size(data) -> Optional[int]:
    """Images of data.train_split: counted when the data are there, else the released split's
    size (data/named_splits.py), else None."""
    from ddpm_landmarks.data.named_splits import RELEASED_COUNTS
    key = (data.dataset, data.root, data.train_split)
    if key not in _POOLS:
        try:
            from ddpm_landmarks.data.registry import build_dataset
            _POOLS[key] = len(build_dataset(data).split(data.train_split))
        except (DataError, OSError):
            sizes = dict(RELEASED_COUNTS.get(data.dataset, ()))
            _POOLS[key] = sizes.get(data.train_split)
    return _POOLS[key]


def training_schedule(job) -> tuple:
    """(TrainConfig, note) a job runs with: epochs.max resolved for its N (module doc)."""
    cfg = job.config
    epochs = getattr(cfg, "epochs", None)
    if epochs is None or epochs.max is None:
        return cfg.train, ""
    n = cfg.fewshot.budget or pool_size(cfg.data)
    if n is None:
        return cfg.train, f"{epochs.max} epochs of an unknown N: steps as configured"
    return resolve_epochs(cfg, n).train, f"<= {epochs.max} epochs of {n} images"
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
    """Rows for every pretraining, source fine-tuning and cell (FLOPs, GPU hours, minutes here
    when timed) and the totals of what is not done yet."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cost = plan.grid.cost
    procs = plan.grid.launcher.num_processes if plan.grid.launcher.kind == "accelerate" else 1
    peaks: dict[str, float] = {}
    flops_of: dict[tuple, float] = {}
    seconds_of: dict[tuple, Optional[float]] = {}
    rows, total_minutes, total_gpu_hours, untimed = [], 0.0, 0.0, 0

    def add(kind: str, name: str, job, key: tuple, make_step, done: bool, note: str) -> None:
        nonlocal total_minutes, total_gpu_hours, untimed
        train_cfg, schedule = training_schedule(job)
        precision, batch = train_cfg.mixed_precision, train_cfg.batch_size
        if precision not in peaks:
            peaks[precision] = matmul_peak_gflops(device, {"no": torch.float32,
                                                           "bf16": torch.bfloat16,
                                                           "fp16": torch.float16}[precision])
        k = key + (precision, batch)
        if k not in flops_of:
            flops_of[k] = count_flops(lambda d: make_step(d, batch))
            expected = flops_of[k] / (peaks[precision] * 1e9)
            seconds_of[k] = time_step(make_step(device, batch), device, precision) \
                if expected <= cost.max_timed_step_s else None
        flops, seconds = flops_of[k], seconds_of[k]
        images = _images(train_cfg, procs)
        peak = cost.gpu_peak_tflops if precision == "no" else cost.gpu_peak_tflops_half
        gpu_hours = images * flops / batch / (peak * 1e12 * cost.gpu_efficiency) / 3600
        minutes = None if seconds is None else images * seconds / batch / 60 / procs
        rows.append({"kind": kind, "name": name, "steps": train_cfg.max_steps, "images": images,
                     "precision": precision, "gflop_per_image": flops / batch / 1e9,
                     "tflop": images * flops / batch / 1e12, "gpu_hours": gpu_hours,
                     "peak_share": None if seconds is None
                     else flops / seconds / 1e9 / peaks[precision],
                     "minutes": minutes, "done": done,
                     "note": "; ".join(filter(None, (note, schedule)))})
        if not done:
            total_gpu_hours += gpu_hours
            if minutes is None:
                untimed += 1
            else:
                total_minutes += minutes

    for job in plan.pretrainings:
        cfg = job.config
        key = ("pretrain", cfg.method, cfg.model.preset, cfg.ssl.encoder, cfg.ssl.in_channels,
               cfg.data.image_size, cfg.ssl.views.global_size, cfg.ssl.views.local_crops)
        add("pretrain", job.name, job, key, lambda d, b, job=job: pretrain_step(job, d, b),
            job.name in done_pretrainings, f"{job.method}, shared by {len(job.users)} cells")

    def finetune_key(job: Cell | SourceJob) -> tuple:
        m = job.config.model
        # An existing checkpoint's network is the one saved with it, not the config's preset.
        saved = m.pretrained_path if (m.init in ("pretrained", "regressor") and not
                                      job.dependencies) else ""
        return ("finetune", m.arch, body_preset(job), m.encoder, m.gray_adapter, m.head,
                str(m.released), job.config.data.image_size, job.config.data.num_landmarks,
                saved)

    for src in plan.sources:
        add("source", src.name, src, finetune_key(src),
            lambda d, b, src=src: finetune_step(src, d, b), src.name in done_sources,
            f"{src.config.data.dataset} labels, shared by {len(src.users)} jobs")
    for cell in plan.cells:
        if cell.kind == "mean_shape":
            continue                   # no network: seconds
        note = (f"pretraining {cell.pretraining.name}" if cell.pretraining else
                f"source {cell.source.name}" if cell.source else cell.kind)
        add("cell", cell.name, cell, finetune_key(cell),
            lambda d, b, cell=cell: finetune_step(cell, d, b), cell.name in done_cells, note)
        if cell.refine is not None:
            r = cell.refine.config
            key = ("refine", r.model.arch, r.model.preset, r.refine.patch_size,
                   r.refine.landmark_input, cell.refine.pretraining is not None)
            add("refine", f"{cell.name}:refine", cell.refine, key,
                lambda d, b, job=cell.refine: refine_step(job, d, b), cell.name in done_cells,
                f"{r.refine.patch_size} px patches, {r.model.preset}")
    return {"rows": rows, "minutes_left": total_minutes, "gpu_hours_left": total_gpu_hours,
            "untimed_left": untimed, "peak_gflops": peaks, "device": str(device),
            "processes": procs, "cost": cost}


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_estimate(plan: Plan, est: dict) -> str:
    cost = est["cost"]
    lines = [f"grid {plan.grid.name}: {len(plan.cells)} cells, {len(plan.pretrainings)} shared "
             f"pretraining(s), {len(plan.sources)} shared source fine-tuning(s); folder "
             f"{plan.grid.grid_dir}", "",
             "| job | name | steps | images | precision | GFLOP/img | TFLOP | GPU h | est. min "
             "here | % of peak here | status | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in est["rows"]:
        share = None if r["peak_share"] is None else 100 * r["peak_share"]
        lines.append(f"| {r['kind']} | {r['name']} | {r['steps']} | {r['images']} | "
                     f"{'fp32' if r['precision'] == 'no' else r['precision']} | "
                     f"{r['gflop_per_image']:.2f} | {r['tflop']:.2f} | {r['gpu_hours']:.2f} | "
                     f"{_fmt(r['minutes'], '.1f')} | {_fmt(share, '.0f')} | "
                     f"{'done' if r['done'] else 'to run'} | {r['note']} |")
    peaks = ", ".join(f"{'fp32' if k == 'no' else k} {v:.0f}"
                      for k, v in est["peak_gflops"].items())
    untimed = (f" and {est['untimed_left']} job(s) not timed (a step over "
               f"cost.max_timed_step_s={cost.max_timed_step_s:g} s here)"
               if est["untimed_left"] else "")
    lines += ["", f"left to run: ~{est['gpu_hours_left']:.1f} GPU hours, assuming a "
              f"{cost.gpu} at {cost.gpu_peak_tflops:g} TFLOP/s for fp32 (TF32; "
              f"{cost.gpu_peak_tflops_half:g} for bf16 / fp16) and {100 * cost.gpu_efficiency:.0f} "
              f"% of that peak (cost.* in the experiment file); FLOPs counted per network on the "
              f"meta device.",
              f"here: ~{est['minutes_left']:.0f} min of training steps{untimed}, from "
              f"{PROFILE_STEPS} timed steps per network at the jobs' batch sizes on "
              f"{est['device']} ({est['processes']} process(es) per job; matmul peak measured "
              f"now: {peaks} GFLOP/s). Data loading, validation and evaluation not included; "
              f"epoch-counted fine-tuning is an upper bound (early stopping)."]
    return "\n".join(lines)
