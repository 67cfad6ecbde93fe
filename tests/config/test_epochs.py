"""Epoch-based fine-tuning schedules (config/finetune.py): steps per epoch as the engine runs
them, the released code's count, and the resolution into train.max_steps / eval_every."""
from __future__ import annotations

import math

import pytest

from ddpm_landmarks.config.finetune import (
    FinetuneConfig,
    resolve_epochs,
    steps_per_epoch,
)


def released_steps(n: int, batch: int = 2, accumulation: int = 8) -> int:
    """downstream_task/model/deep_learning.py: drop_last=False, a step every 8 batches and at
    the last batch."""
    batches = math.ceil(n / batch)
    return sum(1 for b in range(1, batches + 1) if b % accumulation == 0 or b == batches)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 16, 25, 50, 130, 195, 550])
def test_released_budgets_have_the_released_steps_per_epoch(n):
    assert steps_per_epoch(n, 2, 8) == released_steps(n)


def test_steps_per_epoch_by_hand():
    assert released_steps(50) == 4 and released_steps(16) == 1 and released_steps(130) == 9
    assert steps_per_epoch(50, 2, 8) == 4          # 25 batches: after 8, 16, 24 and 25
    assert steps_per_epoch(17, 2, 8) == 1          # 8 whole batches (the released code: 2)
    assert steps_per_epoch(1, 2, 8) == 1           # the image twice fills one batch
    assert steps_per_epoch(50, 2, 8, num_processes=2) == 2     # 12 batches per process
    with pytest.raises(ValueError, match="positive counts"):
        steps_per_epoch(0, 2, 8)


def test_resolve_epochs():
    cfg = FinetuneConfig()
    cfg.train.batch_size, cfg.train.grad_accum = 2, 8
    assert resolve_epochs(cfg, 50) is cfg                      # epochs.max unset: unchanged
    cfg.epochs.max = 200
    out = resolve_epochs(cfg, 50)
    assert (out.train.max_steps, out.train.eval_every) == (800, 4)
    assert cfg.train.max_steps == 1000                          # the input is not modified
    cfg.epochs.eval_every = 5
    assert resolve_epochs(cfg, 5).train.eval_every == 5
    cfg.epochs.max = 0
    with pytest.raises(ValueError, match="epochs.max=0"):
        resolve_epochs(cfg, 5)
