"""A run folder belongs to one run.

    folder = claim_run_folder(run_dir, config_dict, resume, overwrite, is_main, rank, with_ema)
    ...                                   # the script builds and checks data and model
    folder.commit(files)                  # only now: config.yaml, splits, ...; resume clean-up

What `claim_run_folder` decides, before anything is written into the folder:
- another process training into the same folder is refused: the main process holds an
  exclusive lock on run_dir/.lock for the life of the run (released by the OS when the process
  dies, so a killed run never leaves a stale lock);
- a fresh run (train.resume='') into a folder that holds anything is an error that names the
  folder and the two ways out: train.resume=latest, or run.overwrite=true, which moves the old
  contents aside (one rename, to <run_dir>.replaced-<time>) before the run starts;
- a resume reads its checkpoint completely first (training/checkpoint.py; resume=latest falls
  back past a broken newest one) and compares the checkpoint's config with the requested one:
  only RESUMABLE_CHANGES may differ (how long, how often to log / evaluate / save, workers,
  the logger, where the data lives); any other difference is an error listing the keys;
- resume=latest with no checkpoint yet starts from step 0, in a folder whose config.yaml (if
  any) is the same run's; its stale metrics and models are cleared on commit.

On commit (main process): the files of the run are written (config.yaml last written is the
one that runs), metrics.jsonl is cut back to the resumed step (a killed run may have logged
steps past its last checkpoint), and best/ is put back to the checkpoint's best (the snapshot
the checkpoint holds), so best/ always agrees with the restored best value and step.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.training.best_model import restore_best
from ddpm_landmarks.training.checkpoint import (
    CheckpointData,
    CheckpointError,
    explicit_checkpoint,
    latest_readable,
    list_checkpoints,
    read_checkpoint,
)
from ddpm_landmarks.utils.atomic import atomic_write_text, move_contents_aside

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
# Config keys (dotted prefixes) a resumed run may change.
RESUMABLE_CHANGES = ("train.max_steps", "train.resume", "train.log_every", "train.image_every",
                     "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.num_workers", "train.max_nonfinite_steps", "logger.", "run.overwrite",
                     "eval.batch_size", "eval.overlays", "data.root")
# What a run writes that a restart from step 0 clears; any of them (or config.yaml,
# checkpoints/) marks a folder as holding a run. Other files (a grid's status file) do not.
_RUN_OUTPUTS = (METRICS_FILE, "best", "export", "images")
_RUN_MARKERS = ("config.yaml", "checkpoints") + _RUN_OUTPUTS


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_differences(before: dict, after: dict, defaults: Optional[dict] = None) -> list[str]:
    """'key: old -> new' for every key that differs and may not change on resume. A key the
    older config lacks (a field added since it was written) is no change when the new value
    is that field's default in `defaults` (new fields default to the old behaviour)."""
    a, b, d = flatten(before), flatten(after), flatten(defaults or {})
    changed = []
    for key in sorted(set(a) | set(b)):
        if key not in a and key in d and b.get(key) == d[key]:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>") and \
                not any(key == p or (p.endswith(".") and key.startswith(p))
                        for p in RESUMABLE_CHANGES):
            changed.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return changed


def _contents(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


@dataclass
class RunFolder:
    run_dir: Path
    is_main: bool
    resume_from: Optional[CheckpointData]
    restart: bool                     # resume=latest without a checkpoint over an older start
    _lock: Optional[object] = None

    def commit(self, files: dict[str, str]) -> None:
        """Write the run's files; align metrics.jsonl and best/ with the resumed state."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.restart:
            for name in _RUN_OUTPUTS:
                path = self.run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for name, text in files.items():
            atomic_write_text(self.run_dir / name, text)
        if self.resume_from is not None:
            truncate_metrics(self.run_dir / METRICS_FILE, int(self.resume_from.state["step"]))
            restore_best(self.run_dir, self.resume_from)

    def release(self) -> None:
        """Give the folder up (the process's exit does it too). A run refused after the claim
        (bad data, a missing export) wrote nothing but the lock: the folder goes again."""
        if self._lock is not None:
            _HELD.pop(self.run_dir.resolve(), None)
            self._lock.close()
            self._lock = None
            _remove_if_unused(self.run_dir)


def _remove_if_unused(run_dir: Path) -> None:
    try:
        if not _contents(run_dir):
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:                    # another process got there first: leave it be
        pass


# Locks this process holds, by run folder: a later run of the same process in the same folder
# (a grid's inline cells, tests) takes the folder over instead of locking itself out.
_HELD: dict[Path, object] = {}


def _take_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    previous = _HELD.pop(key, None)
    if previous is not None:
        previous.close()               # closing the file releases its lock
    fh = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise ConfigError(f"{run_dir}: another process (pid {holder}) is training into this run "
                          f"folder; wait for it or choose another run.name") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD[key] = fh
    return fh


def claim_run_folder(run_dir: Path, config_dict: dict, resume: str, overwrite: bool,
                     is_main: bool, rank: int = 0, with_ema: bool = False,
                     defaults: Optional[dict] = None) -> RunFolder:
    """Check that this run may use `run_dir` (module doc); lock it on the main process."""
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise ConfigError(f"run.overwrite=true starts {run_dir} afresh and train.resume="
                          f"{resume!r} continues it: choose one")
    lock = _take_lock(run_dir) if is_main else None
    try:
        folder = _decide(run_dir, config_dict, resume, overwrite, is_main, rank, with_ema,
                         defaults)
    except BaseException:
        if lock is not None:
            _HELD.pop(run_dir.resolve(), None)
            lock.close()
            _remove_if_unused(run_dir)
        raise
    folder._lock = lock
    return folder


def _decide(run_dir: Path, config_dict: dict, resume: str, overwrite: bool, is_main: bool,
            rank: int, with_ema: bool, defaults: Optional[dict]) -> RunFolder:
    # Only the main process judges the folder (the others may look at it after the main one
    # has started writing); every process reads the checkpoint it resumes from.
    contents = _contents(run_dir) if is_main else []
    if not resume:
        if contents and not overwrite:
            raise ConfigError(
                f"run folder {run_dir} is not empty ({', '.join(contents[:6])}"
                f"{', ...' if len(contents) > 6 else ''}): it belongs to another run. Continue "
                f"that run with train.resume=latest, or start afresh with run.overwrite=true "
                f"(moves the old contents aside), or choose another run.name")
        if contents and is_main:
            aside = move_contents_aside(run_dir, contents)
            log.warning("run.overwrite: the previous contents of %s moved to %s", run_dir, aside)
        return RunFolder(run_dir, is_main, None, restart=False)

    if resume == "latest":
        data = latest_readable(run_dir, rank, with_ema)
        if data is None and list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir}: no checkpoint can be read (see the warnings above); "
                              f"start afresh with train.resume='' run.overwrite=true")
    else:
        try:
            data = read_checkpoint(explicit_checkpoint(run_dir, resume), rank, with_ema)
        except (CheckpointError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
    if data is None:                   # nothing to resume: from step 0
        previous = _saved_config(run_dir) if is_main else None
        if previous is not None:
            _check_same_run(previous, config_dict, f"{run_dir / 'config.yaml'}", defaults)
        elif any(name in _RUN_MARKERS for name in contents):
            raise ConfigError(f"run folder {run_dir} holds {', '.join(contents[:6])} but no "
                              f"config.yaml: not a run of this framework; choose another "
                              f"run.name, or start afresh with train.resume='' run.overwrite=true")
        log.info("resume=latest: no checkpoint in %s, starting from step 0", run_dir)
        return RunFolder(run_dir, is_main, None,
                         restart=any(name in _RUN_MARKERS for name in contents))
    saved = data.state.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{data.path}: the checkpoint does not record its config (written by "
                          f"an older version); start afresh with run.overwrite=true")
    _check_same_run(saved, config_dict, str(data.path), defaults)
    return RunFolder(run_dir, is_main, data, restart=False)


def _saved_config(run_dir: Path) -> Optional[dict]:
    import yaml
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return loaded if isinstance(loaded, dict) else None


def _check_same_run(saved: dict, requested: dict, where: str,
                    defaults: Optional[dict] = None) -> None:
    changed = config_differences(saved, requested, defaults)
    if changed:
        raise ConfigError(f"cannot resume {where} with another config; changed: "
                          f"{'; '.join(changed)}. Only {', '.join(RESUMABLE_CHANGES)} may change "
                          f"on resume; start a new run.name (or run.overwrite=true) instead")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl logged at steps <= `step` (and drop a torn last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))

