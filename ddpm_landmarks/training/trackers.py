"""Experiment logging through Accelerate's trackers (W&B, TensorBoard or none), plus PNG grids.

    log_with, init_kwargs = tracker_setup(cfg.logger, run_dir, run_name=cfg.run.name)
    accelerator = Accelerator(log_with=log_with, project_dir=run_dir, ...)
    accelerator.init_trackers(cfg.logger.project, config=flatten_config(to_dict(cfg)),
                              init_kwargs=init_kwargs)
    accelerator.log({"loss": 0.1}, step=step)
    log_image_grids(accelerator, {"samples": grid}, step)        # + run_dir/images/*.png
    accelerator.end_training()

W&B mode 'auto' is online only when an API key is available (WANDB_API_KEY or a netrc entry for
the W&B host); otherwise offline: a complete local run under run_dir/wandb/offline-run-* that
`wandb sync` uploads later. So a cluster node without internet or credentials never blocks or
fails on login. TensorBoard event files go to run_dir/<project>/ (Accelerate's layout:
logging_dir = project_dir, one sub-folder per project name).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.evaluation.visualize import write_png
from ddpm_landmarks.utils.wandb import resolve_wandb_mode

IMAGES_SUBDIR = "images"
_offline_hint_shown = False


def _is_main_process() -> bool:
    # Launchers (torchrun, accelerate launch) set RANK; the hint should print once per job.
    return int(os.environ.get("RANK", "0")) == 0


def tracker_setup(cfg, run_dir: str | Path,
                  run_name: Optional[str] = None) -> tuple[Optional[str], dict]:
    """(log_with, init_kwargs) for Accelerator(log_with=...) and accelerator.init_trackers.

    cfg is a LoggerConfig. kind 'none', or W&B mode 'disabled', give (None, {}): no tracker.
    run_name defaults to the run folder's name.
    """
    global _offline_hint_shown
    run_dir = Path(run_dir)
    name = run_name or run_dir.name
    if cfg.kind == "none":
        return None, {}
    if cfg.kind == "tensorboard":
        # SummaryWriter's folder comes from Accelerator(project_dir=run_dir): run_dir/<project>.
        return "tensorboard", {"tensorboard": {}}
    if cfg.kind != "wandb":
        raise ConfigError(f"logger.kind: {cfg.kind!r} is not wandb | tensorboard | none")
    mode = resolve_wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return None, {}
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"dir": str(run_dir), "name": name, "mode": mode}
    if cfg.entity:
        kwargs["entity"] = cfg.entity
    if cfg.group:
        kwargs["group"] = cfg.group
    if cfg.tags:
        kwargs["tags"] = list(cfg.tags)
    if mode == "offline" and not _offline_hint_shown and _is_main_process():
        _offline_hint_shown = True
        print(f"W&B: no API key found, logging offline under {run_dir / 'wandb'}; upload later "
              f"with: wandb sync {run_dir / 'wandb'}/offline-run-*")
    return "wandb", {"wandb": kwargs}


def flatten_config(data: dict, prefix: str = "", sep: str = ".") -> dict:
    """{"data": {"image_size": 64}} -> {"data.image_size": 64}.

    Lists and tuples become JSON strings: TensorBoard's hparams accept only scalars, and a
    string still reads well in W&B. None stays None (TensorBoard skips it).
    """
    flat: dict = {}
    for key, value in data.items():
        dotted = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_config(value, dotted, sep))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(value, default=str)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[dotted] = value
        else:
            flat[dotted] = str(value)
    return flat


def to_hwc_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W), (C, H, W) or a batch (N, C, H, W) float in [0, 1] -> (H, W, C) uint8, C in {1, 3}.

    A batch is tiled into a near-square grid. Values outside [0, 1] are clipped: callers with
    [-1, 1] model outputs map them with (x + 1) / 2 first.
    """
    x = torch.as_tensor(image).detach().float().cpu()
    if x.ndim == 4:
        from torchvision.utils import make_grid
        gray = x.shape[1] == 1
        x = make_grid(x, nrow=math.ceil(math.sqrt(x.shape[0])), padding=2, pad_value=1.0)
        x = x[:1] if gray else x          # make_grid turns gray into 3 equal channels
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected (H, W), (C, H, W) or (N, C, H, W) with C 1 or 3, "
                         f"got {tuple(torch.as_tensor(image).shape)}")
    x = (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def _png_path(run_dir: Path, name: str, step: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return run_dir / IMAGES_SUBDIR / f"{safe}_step{int(step):08d}.png"


def log_image_grids(accelerator, images: dict[str, Any], step: int,
                    run_dir: Optional[str | Path] = None) -> list[Path]:
    """Log image grids to the active trackers and save them as PNGs (main process only).

    images: name -> float tensor in [0, 1], see to_hwc_uint8. PNGs go to
    run_dir/images/{name}_step{step:08d}.png (written atomically), always, so the grids
    exist even without a tracker. run_dir defaults to accelerator.project_dir.
    Returns the PNG paths written ([] on other processes).
    """
    if not accelerator.is_main_process:
        return []
    run_dir = Path(run_dir if run_dir is not None else accelerator.project_dir or ".")
    arrays = {name: to_hwc_uint8(image) for name, image in images.items()}
    active = {tracker.name for tracker in accelerator.trackers}
    if "wandb" in active:
        import wandb
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log({name: wandb.Image(a[..., 0] if a.shape[2] == 1 else a)
                 for name, a in arrays.items()}, step=int(step))
    if "tensorboard" in active:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for name, a in arrays.items():
            writer.add_image(name, np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a,
                             int(step), dataformats="HWC")
        writer.flush()
    written = []
    for name, a in arrays.items():
        # OpenCV writes BGR; gray stays a single 2-D channel.
        bgr = a[..., 0] if a.shape[2] == 1 else np.ascontiguousarray(a[..., ::-1])
        written.append(write_png(_png_path(run_dir, name, step), bgr))
    return written
