"""Training checkpoints: run_dir/checkpoints/step_00001000/ (accelerate state + trainer_state.json).

A checkpoint is written into checkpoints/.tmp-step_xxxxxxxx and renamed into place only when
complete, so a job killed mid-save leaves the previous checkpoint intact and loadable; the
stale temporary folder is ignored by find_latest() and removed by the next save.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ddpm_landmarks.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N folders holding trainer_state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest(run_dir: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(run_dir: Path, resume: str) -> Optional[Path]:
    """"" -> None (fresh start); "latest" -> newest complete checkpoint or None; else a path."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest(run_dir)
        if latest is None:
            log.info("resume=latest: no checkpoint in %s, starting from scratch", run_dir)
        return latest
    path = Path(resume)
    if not path.exists() and (Path(run_dir) / "checkpoints" / resume).exists():
        path = Path(run_dir) / "checkpoints" / resume   # a bare folder name such as step_00000500
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint folder "
                                f"(use '', 'latest' or a path like {checkpoint_dir(run_dir, 500)})")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: {path} has no {STATE_FILE}; "
                                "it is not a complete checkpoint")
    return path


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def save_checkpoint(accelerator, run_dir: Path, step: int, extra_state: dict,
                    keep: int = 3) -> Path:
    """Save the accelerate state (models, optimisers, schedulers, RNG, registered objects).

    Must be called by every process: accelerate writes the per-process RNG files from each one.
    Only the main process creates, renames and deletes folders.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(root)       # leftovers of a save that was killed
        tmp.mkdir()
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        # Written last: its presence is what marks a folder as a complete checkpoint.
        state = {"step": step, **extra_state}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
    accelerator.wait_for_everyone()    # every process's files are in tmp before the rename

    if accelerator.is_main_process:
        if final.exists():             # same step saved again: move the old one out of the way
            old = root / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        rotate_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    root = Path(run_dir) / "checkpoints"
    for old in list_checkpoints(run_dir)[:-keep]:
        # Rename first, then delete: a crash mid-delete leaves only an ignored temp folder.
        doomed = root / f"{_TMP_PREFIX}delete-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temp(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX):
            log.warning("removing incomplete checkpoint folder %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
