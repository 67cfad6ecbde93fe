"""Run a training entry script with faults injected from the environment (fault-injection
suite only; nothing in the package reads these variables).

    FAULT_KILL_AT_WRITE=N   SIGKILL this process at the N-th file a checkpoint writes
                            (mid-save: a torn temporary checkpoint folder is left behind)
    FAULT_NAN_FROM_BATCH=B  the loss is NaN from this process's B-th micro-batch (1-based) ...
    FAULT_NAN_BATCHES=K     ... for K micro-batches (default 1; 0 = for ever)

    python experiments/faults/faulty_launch.py ddpm_landmarks.finetune --config ... overrides
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the project root


def kill_at_write(n: int) -> None:
    """Count the files checkpoint.save_checkpoint writes; SIGKILL at the n-th."""
    from ddpm_landmarks.training import checkpoint
    count = {"files": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            count["files"] += 1
            if count["files"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    checkpoint.save_file = counted(checkpoint.save_file)
    checkpoint._json = counted(checkpoint._json)


def nan_loss(first: int, count: int) -> None:
    """Wrap every method's loss: NaN on the micro-batches [first, first + count) (1-based)."""
    import torch

    from ddpm_landmarks.methods.base import Method
    calls = {"n": 0}

    def wrapped(loss_fn):
        def loss(self, *args, **kwargs):
            value, logs = loss_fn(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] >= first and (count == 0 or calls["n"] < first + count):
                value = value * torch.tensor(float("nan"))
            return value, logs
        return loss

    for cls in _subclasses(Method):
        if "loss" in cls.__dict__:
            cls.loss = wrapped(cls.__dict__["loss"])


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def main() -> None:
    module, argv = sys.argv[1], sys.argv[2:]
    # Import the methods so that their classes exist before the loss is wrapped.
    import ddpm_landmarks.methods.classification  # noqa: F401
    import ddpm_landmarks.methods.ddpm  # noqa: F401
    import ddpm_landmarks.methods.heatmap_regression  # noqa: F401
    if os.environ.get("FAULT_KILL_AT_WRITE"):
        kill_at_write(int(os.environ["FAULT_KILL_AT_WRITE"]))
    if os.environ.get("FAULT_NAN_FROM_BATCH"):
        nan_loss(int(os.environ["FAULT_NAN_FROM_BATCH"]),
                 int(os.environ.get("FAULT_NAN_BATCHES", 1)))
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
