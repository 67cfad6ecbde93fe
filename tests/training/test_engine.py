"""Training engine: LR schedule, accumulation, EMA, checkpoints, resume, 2-process equivalence."""
from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from ddpm_landmarks.config.training import OptimConfig, TrainConfig
from ddpm_landmarks.training import checkpoint as ckpt_mod
from ddpm_landmarks.training.checkpoint import (
    find_latest,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from ddpm_landmarks.training.engine import Trainer, reset_accelerate_state
from ddpm_landmarks.training.optim import build_scheduler, lr_factor

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "accelerate_scripts" / "engine_two_procs.py"
_spec = importlib.util.spec_from_file_location("engine_two_procs", SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def make_trainer(run_dir, *, noise=False, optim=None, n_images=24, **train_kwargs):
    reset_accelerate_state()
    kwargs = dict(max_steps=4, batch_size=4, grad_accum=1, ema_decay=0.9, checkpoint_every=0,
                  keep_checkpoints=3, num_workers=0, log_every=1, image_every=0, seed=0)
    kwargs.update(train_kwargs)
    method = toy.ToyMethod(seed=0, noise=noise)
    optim = optim or OptimConfig(lr=1e-2, warmup_steps=2, max_grad_norm=1.0)
    return Trainer(method, toy.ToyImages(n_images), TrainConfig(**kwargs), optim, run_dir,
                   {"test": True})


def weights(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a, b, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol, rtol=0), (x - y).abs().max()


# ----------------------------------------------------------------------------------------------
# LR schedule
# ----------------------------------------------------------------------------------------------

def test_lr_factor_hand_values():
    f = lambda s, **kw: lr_factor(s, warmup=4, total=12, **kw)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)                 # cosine starts at the top
    assert f(8) == pytest.approx(0.5)                 # half-way through the decay
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(12) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    assert f(8, min_ratio=0.1) == pytest.approx(0.55)
    assert f(12, min_ratio=0.1) == pytest.approx(0.1)
    assert f(1, schedule="constant") == pytest.approx(0.5)
    assert f(100, schedule="constant") == 1.0
    assert lr_factor(0, warmup=0, total=10) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, 1, 10, schedule="linear")


def test_scheduler_follows_lr_factor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, OptimConfig(lr=2.0, warmup_steps=3, min_lr_ratio=0.2), total_steps=9)
    for step in range(12):
        assert sched.get_last_lr()[0] == pytest.approx(2.0 * lr_factor(step, 3, 9, "cosine", 0.2))
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------------------------
# Accumulation, clipping, EMA
# ----------------------------------------------------------------------------------------------

def test_clip_and_ema_only_on_optimizer_steps(tmp_path, monkeypatch):
    calls = []
    original = Accelerator.clip_grad_norm_

    def counting(self, *args, **kwargs):
        calls.append(self.sync_gradients)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", counting)
    trainer = make_trainer(tmp_path / "run", grad_accum=2, max_steps=5)
    summary = trainer.fit()
    assert summary["step"] == 5 and trainer.micro_step == 10
    assert calls == [True] * 5                        # once per optimiser step, never mid-accum
    assert trainer.ema.optimization_step == 5
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4, 5]
    for h in trainer.history:
        assert math.isfinite(h["train/grad_norm"]) and h["train/grad_norm"] > 0
        # The logged lr is the one the next optimiser step uses.
        assert h["train/lr"] == pytest.approx(1e-2 * lr_factor(h["step"], 2, 5, "cosine", 0.0))
    assert (tmp_path / "run" / "export" / "weights.pt").is_file()


def test_grad_accum_matches_bigger_batch(tmp_path):
    # 24 images: batch 4 x accum 2 and batch 8 x accum 1 both give 3 steps/epoch; 5 steps cross
    # an epoch boundary, with shuffling.
    a = make_trainer(tmp_path / "a", batch_size=4, grad_accum=2, max_steps=5)
    a.fit()
    b = make_trainer(tmp_path / "b", batch_size=8, grad_accum=1, max_steps=5)
    b.fit()
    assert_same_tensors(list(weights(a).values()), list(weights(b).values()))
    assert_same_tensors(a.ema.shadow_params, b.ema.shadow_params)
    assert a.ema.optimization_step == b.ema.optimization_step == 5


def test_image_logging_uses_ema_and_leaves_training_alone(tmp_path):
    logged = []
    plain = make_trainer(tmp_path / "plain", max_steps=4, noise=True)
    plain.fit()

    reset_accelerate_state()
    method = toy.ToyMethod(seed=0, noise=True)
    cfg = TrainConfig(max_steps=4, batch_size=4, ema_decay=0.9, checkpoint_every=0,
                      num_workers=0, image_every=2, seed=0)
    trainer = Trainer(method, toy.ToyImages(24), cfg, OptimConfig(lr=1e-2, warmup_steps=2),
                      tmp_path / "img", {"test": True},
                      log_images=lambda acc, images, step: logged.append((step, images)))
    real_log_images = method.log_images

    def checking_log_images(model, batch):
        assert_same_tensors(list(model.parameters()), trainer.ema.shadow_params)  # EMA weights
        assert batch.shape == (4, 1, 8, 8)
        torch.rand(3)                               # must not shift the training RNG
        return real_log_images(model, batch)

    method.log_images = checking_log_images
    trainer.fit()
    assert [step for step, _ in logged] == [2, 4]
    assert set(logged[0][1]) == {"pred"}
    # Raw weights restored after each grid; training identical to the run without grids.
    assert_same_tensors(list(weights(trainer).values()), list(weights(plain).values()))
    # The export holds the EMA weights, not the raw ones.
    assert_same_tensors(list(method.exported.values()), trainer.ema.shadow_params)


def test_data_loader_workers_give_the_same_run(tmp_path):
    a = make_trainer(tmp_path / "a", max_steps=7, num_workers=0)
    a.fit()
    b = make_trainer(tmp_path / "b", max_steps=7, num_workers=2)
    b.fit()
    assert_same_tensors(list(weights(a).values()), list(weights(b).values()))
    c = make_trainer(tmp_path / "c", max_steps=2, channels_last=True)
    assert math.isfinite(c.fit()["loss"])


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------

def _assert_same_state(a: Trainer, b: Trainer) -> None:
    assert a.step == b.step and a.epoch == b.epoch and a.micro_step == b.micro_step
    assert_same_tensors(list(weights(a).values()), list(weights(b).values()))
    assert_same_tensors(a.ema.shadow_params, b.ema.shadow_params)
    assert a.ema.optimization_step == b.ema.optimization_step
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for key in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert_same_tensors([sa["state"][key][name]], [sb["state"][key][name]])
    assert a.scheduler.scheduler.last_epoch == b.scheduler.scheduler.last_epoch
    # Same losses on the steps both logged: same data order and same method noise.
    la = {h["step"]: h["train/loss"] for h in a.history}
    lb = {h["step"]: h["train/loss"] for h in b.history}
    for step in set(la) & set(lb):
        assert la[step] == pytest.approx(lb[step], abs=1e-6), step


def _record_batches(trainer, seen: list, crash_at: int | None = None) -> None:
    """Wrap the method's loss to record each micro-batch (and optionally crash)."""
    real_loss = trainer.method.loss

    def loss(model, batch, generator=None):
        if crash_at is not None and trainer.micro_step == crash_at:
            raise RuntimeError("simulated crash")
        seen.append(batch.detach().clone())
        return real_loss(model, batch, generator=generator)

    trainer.method.loss = loss


@pytest.mark.parametrize("how", ["extend", "crash"])
def test_resume_matches_uninterrupted(tmp_path, how):
    # batch 2 x accum 2 on 24 images: 12 micro-batches, 6 optimiser steps per epoch. The cut is
    # at step 8 (epoch 1, 4 of 12 batches used: skip + epoch counter both matter); steps 9..16
    # cross the epoch boundary at 12.
    common = dict(batch_size=2, grad_accum=2, noise=True, checkpoint_every=4)
    optim = None
    if how == "extend":
        # The brief's protocol: max_steps 8, then resume with 16. A cosine would depend on
        # max_steps, so a constant schedule (after warm-up) is used here.
        optim = OptimConfig(lr=1e-2, warmup_steps=2, schedule="constant")
    full_seen, cut_seen = [], []
    full = make_trainer(tmp_path / "full", max_steps=16, optim=optim, **common)
    _record_batches(full, full_seen)
    full.fit()
    if how == "extend":
        cut = make_trainer(tmp_path / "cut", max_steps=8, optim=optim, **common)
        _record_batches(cut, cut_seen)
        cut.fit()
    else:
        # A crash (e.g. pre-emption) during step 10 with the same config (cosine over 16 steps).
        cut = make_trainer(tmp_path / "cut", max_steps=16, **common)
        _record_batches(cut, cut_seen, crash_at=19)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cut.fit()
        cut_seen = cut_seen[:16]                  # what the step-8 checkpoint had consumed
    assert find_latest(tmp_path / "cut").name == "step_00000008"
    resumed = make_trainer(tmp_path / "cut", max_steps=16, resume="latest", optim=optim, **common)
    assert (resumed.step, resumed.epoch, resumed.batches_in_epoch) == (8, 1, 4)
    _record_batches(resumed, cut_seen)
    resumed.fit()
    _assert_same_state(full, resumed)
    # The data order itself: same micro-batches in the same order, reshuffled per epoch.
    assert len(full_seen) == len(cut_seen) == 32
    assert all(torch.equal(a, b) for a, b in zip(full_seen, cut_seen))
    epoch0, epoch1 = torch.cat(full_seen[:12]), torch.cat(full_seen[12:24])
    assert not torch.equal(epoch0, epoch1)                      # a new order each epoch...
    assert torch.allclose(epoch0.sum(0), epoch1.sum(0))          # ...of the same images


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(run, "") is None
    assert resolve_resume(run, "latest") is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(run, str(tmp_path / "nope"))
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(run, "step_00000002")
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
    assert resolve_resume(run, "step_00000002") == run / "checkpoints" / "step_00000002"
    assert resolve_resume(run, "latest") == run / "checkpoints" / "step_00000002"


# ----------------------------------------------------------------------------------------------
# Crash-safe checkpoint writes and rotation
# ----------------------------------------------------------------------------------------------

def test_interrupted_checkpoint_write(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = make_trainer(run, max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    trainer.fit()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    saved = weights(trainer)

    # 1) killed while the files are written: a partial temp folder is left behind.
    real_save_file = ckpt_mod.save_file
    calls = []

    def killed_after_two_files(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt("killed mid-save")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", killed_after_two_files)
    trainer.step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer._save()
    monkeypatch.undo()
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()
    assert find_latest(run).name == "step_00000003"

    # 2) killed just before the rename: the temp folder is complete but still ignored.
    real_replace = os.replace

    def failing_replace(src, dst):          # os is shared: let the JSON file's rename through
        if Path(src).is_dir():
            raise OSError("killed before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    trainer.step = 5
    with pytest.raises(OSError):
        trainer._save()
    monkeypatch.undo()
    assert (run / "checkpoints" / ".tmp-step_00000005" / "trainer_state.json").is_file()
    assert find_latest(run).name == "step_00000003"

    # The previous checkpoint loads; the next saves clean the temp folders and rotate.
    resumed = make_trainer(run, max_steps=5, checkpoint_every=1, keep_checkpoints=2,
                           resume="latest")
    assert resumed.step == 3
    assert_same_tensors(list(weights(resumed).values()), list(saved.values()))
    resumed.fit()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]


# ----------------------------------------------------------------------------------------------
# A real 2-process run
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    # 2 processes x batch 2 == 1 process x batch 4: both processes draw the same shuffled order
    # (seed + epoch) and accelerate gives process i batches i, i+2, ... of size 2, so each
    # optimiser step averages gradients over exactly the 4 images of the 1-process batch.
    out = tmp_path / "two"
    out.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true",          # --multi_gpu launcher (torchrun) on gloo/CPU
           "HF_HOME": str(tmp_path / "hf"),       # no user accelerate config file
           "PYTHONPATH": str(ROOT)}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(SCRIPT), str(out), "--batch-size", "2", "--max-steps", "8"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(out / "result.pt", weights_only=False)
    assert two["num_processes"] == 2
    assert [p.name for p in list_checkpoints(out / "run")] == ["step_00000006", "step_00000008"]
    # Each process's RNG state, as safetensors + JSON (nothing pickled).
    assert (out / "run" / "checkpoints" / "step_00000008" / "rng_1.safetensors").is_file()
    assert not list((out / "run" / "checkpoints").rglob("*.pkl"))

    reset_accelerate_state()
    one = toy.run(tmp_path / "one", batch_size=4, max_steps=8)
    assert one["num_processes"] == 1
    # Tolerance: the gloo all-reduce sums in another order than one big batch (measured
    # difference ~1.5e-8); 1e-6 is far below one optimiser step (lr 1e-2).
    assert_same_tensors(list(two["weights"].values()), list(one["weights"].values()), atol=1e-6)
    assert_same_tensors(list(two["ema"].values()), list(one["ema"].values()), atol=1e-6)
    losses_two = [h["train/loss"] for h in two["history"]]
    losses_one = [h["train/loss"] for h in one["history"]]
    assert losses_two == pytest.approx(losses_one, abs=1e-6)   # loss averaged over processes
    lrs = [h["train/lr"] for h in two["history"]]
    assert lrs == pytest.approx([h["train/lr"] for h in one["history"]])  # 1 LR step per step
