"""run_dir/best/: the model at the best validation value, and its agreement with checkpoints.

    export_best(run_dir, export, step, value, monitor)   # engine, on a new best
    restore_best(run_dir, checkpoint_data)               # run folder, on resume

best/ is the method's export plus best.json ({"step", "value", "monitor"}), swapped in as a
whole: at any moment best/ is the previous best, the new one, or (between two renames) absent.
Files in best/ are never rewritten in place, so every checkpoint keeps a snapshot of best/ as
hard links (training/checkpoint.py); a resumed run puts that snapshot back when best/ says
another step (a best exported after the checkpoint, by the run that was killed).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.training.checkpoint import BEST_SNAPSHOT, CheckpointData
from ddpm_landmarks.utils.atomic import atomic_directory, atomic_write_text, fsync_path

log = logging.getLogger(__name__)

BEST_INFO = "best.json"


def export_best(run_dir: Path, export: Callable[[Path], object], step: int, value: float,
                monitor: str) -> None:
    """best/ = export(folder) + best.json, replacing the previous best as a whole."""
    run_dir = Path(run_dir)
    best, new, old = run_dir / BEST_SNAPSHOT, run_dir / ".best-new", run_dir / ".best-old"
    for stale in (new, old):
        shutil.rmtree(stale, ignore_errors=True)
    export(new)
    atomic_write_text(new / BEST_INFO, json.dumps(
        {"step": step, "value": value, "monitor": monitor}) + "\n")
    if best.exists():
        os.replace(best, old)
    os.replace(new, best)
    fsync_path(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def restore_best(run_dir: Path, data: CheckpointData) -> None:
    """best/ as the checkpoint knew it: its snapshot when best/ says another step, none when
    the checkpoint had no best yet."""
    best = Path(run_dir) / BEST_SNAPSHOT
    step = int(data.state.get("best_step", -1))
    info = best / BEST_INFO
    current = json.loads(info.read_text()).get("step") if info.is_file() else None
    if step < 0:
        if best.exists():
            shutil.rmtree(best)
            log.info("removed %s: saved after the checkpoint being resumed", best)
        return
    if current == step:
        return
    snapshot = data.path / BEST_SNAPSHOT
    if not snapshot.is_dir():
        raise ConfigError(f"{data.path}: records a best model at step {step} but holds no "
                          f"snapshot of it")
    with atomic_directory(best) as tmp:
        for item in snapshot.rglob("*"):
            target = tmp / item.relative_to(snapshot)
            if item.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
    log.info("best/ restored to the checkpoint's best (step %d)", step)
