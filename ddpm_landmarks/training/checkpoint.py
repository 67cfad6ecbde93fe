"""Training checkpoints: run_dir/checkpoints/step_00001000/, safetensors and JSON only.

    model.safetensors              the unwrapped model's state_dict
    optimizer.safetensors / .json  the optimiser's tensors ("state.<param>.<key>") / the rest
    scheduler.json                 the LR schedule's state (numbers and lists)
    ema.safetensors / .json        EMA shadow weights and step (when train.ema)
    scaler.json                    the fp16 GradScaler's state (when there is one)
    rng_<rank>.safetensors / .json each process's torch (CPU, CUDA), numpy and python RNG states
    best/                          the run's best/ at save time (hard links: no copy)
    trainer_state.json             written last: step, data position, best, counters and the
                                   full resolved config of the run

Nothing is unpickled, ever: a .pkl or .bin planted in the folder is not opened (loading a
user's file must not run code). A checkpoint is written into checkpoints/.tmp-step_x, every
file fsynced, then renamed into place: a job killed mid-save leaves the previous checkpoint
intact, and the stale temporary folder is ignored and removed by the next save. Loading reads
and checks every file into memory before anything is applied (read_checkpoint), so a corrupt
checkpoint changes nothing: CheckpointError names it, and resume=latest falls back to the one
before with a warning (latest_readable).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddpm_landmarks.utils.atomic import atomic_write_text, fsync_path

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
BEST_SNAPSHOT = "best"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (message names the folder and the file)."""


@dataclass
class CheckpointData:
    """Everything a checkpoint holds for one process, read and checked, not yet applied."""
    path: Path
    state: dict                                   # trainer_state.json
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    ema: Optional[tuple[dict[str, torch.Tensor], dict]] = None
    scaler: Optional[dict] = None
    rng: Optional[dict] = None                    # this process's, None: another process count
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

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
    """The newest complete checkpoint folder, None when there is none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(run_dir: Path, resume: str) -> Optional[Path]:
    """"" -> None (fresh start); "latest" -> newest complete checkpoint or None; else a path."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest(run_dir)
    return explicit_checkpoint(run_dir, resume)


def explicit_checkpoint(run_dir: Path, resume: str) -> Path:
    """train.resume given as a path or a step folder name -> the folder, or an error."""
    path = Path(resume)
    if not path.exists() and (Path(run_dir) / "checkpoints" / resume).exists():
        path = Path(run_dir) / "checkpoints" / resume   # a bare name such as step_00000500
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint folder "
                                f"(use '', 'latest' or a path like {checkpoint_dir(run_dir, 500)})")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: {path} has no {STATE_FILE}; "
                                "it is not a complete checkpoint")
    return path


# ----------------------------------------------------------------------------------------------
# Process state: RNG, optimiser, as tensors + JSON
# ----------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch / CUDA / numpy / python random states."""
    import random
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next],
            "cuda_devices": sum(k.startswith("cuda.") for k in tensors)}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(int(meta.get("cuda_devices", 0)))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer.state_dict() -> (tensors, JSON): tensors keyed "state.<p>.<key>"."""
    tensors, state = {}, {}
    for index, values in state_dict["state"].items():
        state[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                state[str(index)][key] = value
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of optimizer_state."""
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def _json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=_plain))


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable in a checkpoint: {type(value).__name__}")


def _link_tree(src: Path, dst: Path) -> None:
    """dst = a copy of the folder src made of hard links (files are never rewritten in place:
    best/ is replaced as a whole), copies where links are impossible."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file():
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            _link_tree(item, dst / item.name)


def save_checkpoint(accelerator, run_dir: Path, step: int, *, model: torch.nn.Module,
                    optimizer, scheduler, ema, trainer_state: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` (module doc). Every process calls it (each writes its RNG file);
    the main process writes the rest, renames the folder into place and rotates old ones."""
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(root)       # leftovers of a save that was killed
        tmp.mkdir()
    accelerator.wait_for_everyone()

    rank = accelerator.process_index
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng_{rank}.safetensors"))
    _json(tmp / f"rng_{rank}.json", meta)
    if main:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        tensors, meta = optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _json(tmp / "optimizer.json", meta)
        _json(tmp / "scheduler.json", scheduler.state_dict())
        if ema is not None:
            tensors, meta = ema.state()
            save_file(tensors, str(tmp / "ema.safetensors"))
            _json(tmp / "ema.json", meta)
        if accelerator.scaler is not None:
            _json(tmp / "scaler.json", accelerator.scaler.state_dict())
        best = Path(run_dir) / BEST_SNAPSHOT
        if trainer_state.get("best_step", -1) >= 0 and best.is_dir():
            _link_tree(best, tmp / BEST_SNAPSHOT)
    accelerator.wait_for_everyone()    # every process's files are in tmp

    if main:
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        # Written last: its presence is what marks a folder as a complete checkpoint.
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state},
                                                       indent=1, sort_keys=True, default=_plain))
        if final.exists():             # same step saved again: move the old one out of the way
            old = root / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
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


# ----------------------------------------------------------------------------------------------
# Read
# ----------------------------------------------------------------------------------------------

def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.json of a checkpoint (CheckpointError when unreadable)."""
    return _read_json(Path(ckpt) / STATE_FILE)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name}: {err}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:    # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name}: "
                              f"{type(err).__name__}: {err}") from None


def read_checkpoint(ckpt: Path, rank: int, with_ema: bool) -> CheckpointData:
    """Every file of checkpoint `ckpt` this process needs, read and checked (module doc)."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    data = CheckpointData(
        path=ckpt, state=state, model=_read_tensors(ckpt / "model.safetensors"),
        optimizer=optimizer_state_dict(_read_tensors(ckpt / "optimizer.safetensors"),
                                       _read_json(ckpt / "optimizer.json")),
        scheduler=_read_json(ckpt / "scheduler.json"))
    if with_ema:
        data.ema = (_read_tensors(ckpt / "ema.safetensors"), _read_json(ckpt / "ema.json"))
    if (ckpt / "scaler.json").is_file():
        data.scaler = _read_json(ckpt / "scaler.json")
    if (ckpt / f"rng_{rank}.safetensors").is_file():
        data.rng = {"tensors": _read_tensors(ckpt / f"rng_{rank}.safetensors"),
                    "meta": _read_json(ckpt / f"rng_{rank}.json")}
    return data


def latest_readable(run_dir: Path, rank: int, with_ema: bool) -> Optional[CheckpointData]:
    """The newest checkpoint that reads completely; a broken one is named in a warning and the
    one before it is tried. None when there is no (readable) checkpoint."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(ckpt, rank, with_ema)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    return None
