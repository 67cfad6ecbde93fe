"""Engine validation hook: best export, early stopping, plateau schedule, resume of that state.

The validator here reports a scripted sequence of values, so every decision of the engine
(which step is best, when to stop, when to cut the lr) has a hand-computed answer.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine import toy  # noqa: E402  (the toy method and images of the engine tests)

from ddpm_landmarks.config.finetune import FinetuneOptimConfig
from ddpm_landmarks.config.training import OptimConfig, TrainConfig
from ddpm_landmarks.training.engine import Trainer, reset_accelerate_state
from ddpm_landmarks.training.optim import WarmupPlateauFactor, build_scheduler


class Scripted:
    """validate(model): the next value of a script, keyed by how often it was called."""

    def __init__(self, values):
        self.values, self.calls, self.weights_seen = list(values), 0, []

    def __call__(self, model):
        assert not model.training                      # the engine evaluates in eval mode
        self.weights_seen.append({k: v.clone() for k, v in model.state_dict().items()})
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"val/mre": value, "val/other": 1.0}


def make(run_dir, validate, optim=None, **train):
    reset_accelerate_state()
    kwargs = dict(max_steps=12, batch_size=4, ema=False, checkpoint_every=0, num_workers=0,
                  log_every=1, image_every=0, eval_every=2, seed=0)
    kwargs.update(train)
    optim = optim or OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    return Trainer(toy.ToyMethod(seed=0), toy.ToyImages(24), TrainConfig(**kwargs), optim,
                   run_dir, {"t": 1}, validate=validate)


def test_best_export_and_logged_values(tmp_path):
    v = Scripted([5.0, 3.0, 4.0, 2.5, 2.6, 2.7])      # at steps 2, 4, 6, 8, 10, 12
    trainer = make(tmp_path, v)
    summary = trainer.fit()
    assert v.calls == 6
    assert (summary["best"], summary["best_step"], summary["stopped_early"]) == (2.5, 8, False)
    # best/ holds the weights the validator saw at step 8 (the 4th call); export/ the last.
    best = torch.load(tmp_path / "best" / "weights.pt")
    for k, w in v.weights_seen[3].items():
        assert torch.equal(best[k], w)
    assert not all(torch.equal(best[k], w) for k, w in v.weights_seen[5].items())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/mre" in r]
    assert [r["step"] for r in val] == [2, 4, 6, 8, 10, 12]
    assert [r["val/mre_best"] for r in val] == [5.0, 3.0, 3.0, 2.5, 2.5, 2.5]


def test_early_stopping_after_patience(tmp_path):
    v = Scripted([5.0, 4.0, 4.5, 4.2, 4.1, 1.0])      # best 4.0 at step 4, then 3 worse
    trainer = make(tmp_path, v, max_steps=100, early_stopping_patience=3)
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["step"] == 10 and summary["best_step"] == 4
    assert v.calls == 5


def test_early_stopping_state_survives_resume(tmp_path):
    # Crash-free cut: run to step 6 with checkpoints, resume to 100 with patience 3.
    values = [5.0, 4.0, 4.5, 4.2, 4.1, 1.0]
    make(tmp_path, Scripted(values), max_steps=6, checkpoint_every=2,
         early_stopping_patience=3).fit()
    v = Scripted(values[3:])                           # the validations after step 6
    resumed = make(tmp_path, v, max_steps=100, checkpoint_every=2, early_stopping_patience=3,
                   resume="latest")
    assert (resumed.best_value, resumed.best_step, resumed.bad_evals) == (4.0, 4, 1)
    summary = resumed.fit()
    assert summary["stopped_early"] and summary["step"] == 10


def test_plateau_factor_hand_values():
    f = WarmupPlateauFactor(warmup=4, factor=0.5, patience=2)
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    for value, scale in [(3.0, 1.0), (3.0, 1.0), (3.1, 0.5), (2.0, 0.5), (2.5, 0.5),
                         (2.0, 0.25)]:
        f.report(value)                                # equal is not better
        assert f(10) == scale
    with pytest.raises(ValueError, match="plateau_factor"):
        WarmupPlateauFactor(0, 1.5, 2)


def test_plateau_schedule_in_the_engine_and_its_resume(tmp_path):
    optim = FinetuneOptimConfig(lr=1e-2, head_lr=None, weight_decay=0.0, warmup_steps=0,
                                schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    values = [5.0, 6.0, 6.0, 6.0, 6.0, 6.0]           # steps 2..12: cut after steps 6 and 10
    trainer = make(tmp_path / "a", Scripted(values), optim=optim, checkpoint_every=4)
    trainer.fit()
    lrs = {h["step"]: h["train/lr"] for h in trainer.history if "train/lr" in h}
    assert lrs[6] == pytest.approx(1e-2) and lrs[7] == pytest.approx(5e-3)
    assert lrs[11] == pytest.approx(2.5e-3)
    # The plateau state is in the checkpoint: resuming at step 8 continues with lr 5e-3.
    resumed = make(tmp_path / "a", Scripted(values[4:]), optim=optim, checkpoint_every=4,
                   resume=str(tmp_path / "a" / "checkpoints" / "step_00000008"))
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(5e-3)
    plateau = resumed.scheduler.scheduler.lr_lambdas[0]
    assert (plateau.scale, plateau.best, plateau.bad) == (0.5, 5.0, 1)


def test_validation_needed_for_early_stopping_and_plateau(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience needs validation"):
        make(tmp_path, None, early_stopping_patience=2)
    optim = FinetuneOptimConfig(schedule="plateau")
    with pytest.raises(ValueError, match="plateau needs validation"):
        make(tmp_path, None, optim=optim)


def test_plateau_scheduler_state_dict_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = FinetuneOptimConfig(warmup_steps=0, schedule="plateau", plateau_patience=1)
    sched = build_scheduler(opt, cfg, total_steps=10)
    sched.lr_lambdas[0].report(1.0)
    sched.lr_lambdas[0].report(2.0)
    state = sched.state_dict()
    other = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, 10)
    other.load_state_dict(state)
    assert other.lr_lambdas[0].scale == 0.5 and other.lr_lambdas[0].best == 1.0
    assert math.isclose(other.lr_lambdas[0](5), 0.5)
