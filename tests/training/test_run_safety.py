"""Runs that a kill, a NaN, an edited config or a hostile file cannot corrupt (issue: trustworthy
runs): one run per folder, config checks on resume, nothing written before the checks,
metrics and best/ aligned with the resumed checkpoint, non-finite steps skipped, no pickle,
fallback past a broken checkpoint, the folder lock, fp16 refused on a CPU, the W&B run id.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import toy  # noqa: E402  (the toy method and images of the engine tests)

from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.config.training import OptimConfig, TrainConfig
from ddpm_landmarks.errors import ConfigError, NonFiniteError
from ddpm_landmarks.finetune import finetune
from ddpm_landmarks.training.checkpoint import list_checkpoints
from ddpm_landmarks.training.engine import Trainer, reset_accelerate_state
from ddpm_landmarks.training.run_folder import claim_run_folder, config_differences

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune" / "synthetic.yaml"
SYNTH = {"data.synthetic_num_images": 40, "data.synthetic_image_size": 64,
         "data.synthetic_num_landmarks": 4, "data.image_size": 32}
SMALL = {"model.init": "scratch", "model.pretrained_path": "''", "model.preset": "tiny",
         "fewshot.budget": 8, "fewshot.val_count": 4, "train.batch_size": 4,
         "train.num_workers": 0, "train.log_every": 1, "train.eval_every": 2,
         "train.early_stopping_patience": 0, "train.checkpoint_every": 2,
         "optim.warmup_steps": 2, "logger.kind": "none", "run.name": "ft"}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def ft(synth_root, out, **values) -> FinetuneConfig:
    merged = {**SYNTH, **SMALL, "data.root": synth_root, "run.output_dir": out, **values}
    return load_config(FINETUNE, [f"{k}={v}" for k, v in merged.items()], cls=FinetuneConfig)


def snapshot(folder: Path) -> dict[str, float]:
    """Every file below `folder` with its modification time (what a refused run must keep)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------

def test_a_fresh_run_into_a_used_folder_is_refused_or_moved_aside(synth_root, tmp_path):
    finetune(ft(synth_root, tmp_path, **{"train.max_steps": 2}))
    run = tmp_path / "ft"
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"run folder .*ft is not empty.*train.resume=latest"
                                          r".*run.overwrite=true"):
        finetune(ft(synth_root, tmp_path, **{"train.max_steps": 4}))
    assert snapshot(run) == before                       # nothing touched
    finetune(ft(synth_root, tmp_path, **{"train.max_steps": 4, "run.overwrite": "true"}))
    aside = list(tmp_path.glob("ft.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000002").is_dir()
    assert list_checkpoints(run)[-1].name == "step_00000004"
    with pytest.raises(ConfigError, match="choose one"):
        finetune(ft(synth_root, tmp_path, **{"run.overwrite": "true", "train.resume": "latest"}))


def test_two_overwrites_in_one_second_move_aside_into_two_folders(tmp_path, monkeypatch):
    from ddpm_landmarks.utils import atomic
    monkeypatch.setattr(atomic.time, "strftime", lambda fmt: "20261205-120000")
    run = tmp_path / "ft"
    for text in ("first", "second"):
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(text)
        atomic.move_contents_aside(run, ["config.yaml"])
    assert list(run.iterdir()) == []
    assert [(p.name, (p / "config.yaml").read_text()) for p in sorted(tmp_path.glob("ft.*"))] == [
        ("ft.replaced-20261205-120000", "first"), ("ft.replaced-20261205-120000-1", "second")]


def test_resume_refuses_a_changed_config_before_writing_anything(synth_root, tmp_path):
    finetune(ft(synth_root, tmp_path, **{"train.max_steps": 2}))
    run = tmp_path / "ft"
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"changed: data.image_size: 32 -> 64; optim.lr: "
                                          r"0.0005 -> 0.01\. Only train.max_steps"):
        finetune(ft(synth_root, tmp_path, **{"train.max_steps": 4, "train.resume": "latest",
                                              "optim.lr": 0.01, "data.image_size": 64}))
    # Another landmark count (the data's shape) is refused the same way, files untouched.
    with pytest.raises(ConfigError, match="data.synthetic_num_landmarks: 4 -> 6"):
        finetune(ft(synth_root, tmp_path, **{"train.resume": "latest",
                                              "data.synthetic_num_landmarks": 6}))
    assert snapshot(run) == before
    # What may change: how long, how often; config.yaml then records the new values.
    finetune(ft(synth_root, tmp_path, **{"train.max_steps": 4, "train.resume": "latest",
                                          "train.log_every": 2}))
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    assert config_differences({"train": {"max_steps": 1}, "logger": {"kind": "none"}},
                              {"train": {"max_steps": 9}, "logger": {"kind": "wandb"}}) == []
    # A checkpoint written before a field existed: the field at its default is no change (new
    # fields default to the old behaviour); any other value is, and so is a removed key.
    defaults = {"model": {"landmark_embedding": 0, "lr": 1.0}}
    old = {"model": {"lr": 2.0}}
    assert config_differences(old, {"model": {"lr": 2.0, "landmark_embedding": 0}},
                              defaults) == []
    assert config_differences(old, {"model": {"lr": 2.0, "landmark_embedding": 6}},
                              defaults) == ["model.landmark_embedding: '<absent>' -> 6"]
    assert config_differences({"model": {"lr": 2.0, "gone": 1}}, {"model": {"lr": 2.0}},
                              defaults) == ["model.gone: 1 -> '<absent>'"]


def test_two_processes_cannot_train_into_one_folder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from ddpm_landmarks.training.run_folder import claim_run_folder\n"
        f"claim_run_folder({str(run)!r}, {{}}, '', False, True)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"another process \(pid {holder.pid}\) is training"):
            claim_run_folder(run, {}, "latest", False, True)
    finally:
        holder.kill()
        holder.wait()
    claim_run_folder(run, {}, "latest", False, True).release()   # free again once it died


# ----------------------------------------------------------------------------------------------
# Resume: metrics and best/ agree with the checkpoint; broken and hostile checkpoints
# ----------------------------------------------------------------------------------------------

class Improving:
    """Validation that improves at every call; raises at call `crash_at` (a killed job)."""

    def __init__(self, crash_at: int = 0):
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("killed")
        return {"val/mre": 10.0 - self.calls}


def toy_trainer(run_dir: Path, validate=None, resume_from=None, **train) -> Trainer:
    reset_accelerate_state()
    kwargs = dict(max_steps=8, batch_size=4, ema=True, ema_decay=0.9, checkpoint_every=4,
                  num_workers=0, log_every=1, image_every=0, eval_every=2 if validate else 0,
                  seed=0)
    kwargs.update(train)
    return Trainer(toy.ToyMethod(seed=0), toy.ToyImages(24), TrainConfig(**kwargs),
                   OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), run_dir,
                   {"train": kwargs}, validate=validate, resume_from=resume_from)


def test_resume_cuts_metrics_and_restores_best_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    # Validations at steps 2, 4, 6; the third (step 6) happens, the fourth (step 8) is killed:
    # best/ is step 6's, the newest checkpoint is step 4's (best step 4), metrics reach step 7.
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(run, Improving(crash_at=4)).fit()
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 6
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8
    config = {"train": dict(max_steps=8, batch_size=4, ema=True, ema_decay=0.9,
                            checkpoint_every=4, num_workers=0, log_every=1, image_every=0,
                            eval_every=2, seed=0)}
    folder = claim_run_folder(run, config, "latest", False, True, with_ema=True)
    assert folder.resume_from.state["step"] == 4 and folder.resume_from.state["best_step"] == 4
    folder.commit({})
    folder.release()
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    best = json.loads((run / "best" / "best.json").read_text())
    assert (best["step"], best["value"]) == (4, 8.0)
    # The restored best/ holds step 4's weights: those of the checkpoint's snapshot.
    saved = torch.load(run / "best" / "weights.pt")
    snap = torch.load(run / "checkpoints" / "step_00000004" / "best" / "weights.pt")
    assert all(torch.equal(saved[k], snap[k]) for k in snap)


def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run = tmp_path / "run"
    toy_trainer(run, checkpoint_every=2, keep_checkpoints=3).fit()
    newest = run / "checkpoints" / "step_00000008"
    (newest / "model.safetensors").write_bytes(b"\x00" * 7)      # torn / corrupt
    trainer = toy_trainer(run, resume="latest", checkpoint_every=2, keep_checkpoints=3)
    assert trainer.step == 6
    assert "step_00000008: cannot read model.safetensors" in caplog.text


def test_resume_never_unpickles_a_file_planted_in_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, max_steps=4).fit()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = run / "checkpoints" / "step_00000004"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl",
                 "scheduler.bin", "pytorch_model.bin"):
        (ckpt / name).write_bytes(pickle.dumps(Payload()))
    trainer = toy_trainer(run, max_steps=6, resume="latest")
    assert trainer.step == 4
    trainer.fit()
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Non-finite steps, fp16
# ----------------------------------------------------------------------------------------------

class NaNAt(toy.ToyMethod):
    """The toy method whose loss is NaN on the micro-steps in `bad` (0-based)."""

    def __init__(self, bad):
        super().__init__(seed=0)
        self.bad, self.calls = set(bad), 0

    def loss(self, model, batch, generator=None):
        loss, logs = super().loss(model, batch, generator)
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.bad else loss), logs


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    reset_accelerate_state()
    cfg = TrainConfig(max_steps=6, batch_size=4, ema=True, ema_decay=0.9, checkpoint_every=3,
                      num_workers=0, log_every=1, image_every=0, seed=0)
    method = NaNAt(bad={2})
    trainer = Trainer(method, toy.ToyImages(24), cfg, OptimConfig(lr=1e-2, warmup_steps=0),
                      tmp_path, {})
    summary = trainer.fit()
    assert summary["step"] == 6 and method.calls == 7          # one micro-step did not count
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_skipped"] == 1
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    for name in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in load_file(
            str(tmp_path / "checkpoints" / "step_00000006" / f"{name}.safetensors")).values())


def test_nan_for_ever_stops_with_the_step_and_keeps_finite_checkpoints(tmp_path):
    reset_accelerate_state()
    cfg = TrainConfig(max_steps=20, batch_size=4, ema=False, checkpoint_every=2,
                      keep_checkpoints=2, num_workers=0, log_every=1, image_every=0, seed=0,
                      max_nonfinite_steps=3)
    trainer = Trainer(NaNAt(bad=set(range(4, 100))), toy.ToyImages(24), cfg,
                      OptimConfig(lr=1e-2, warmup_steps=0), tmp_path, {})
    with pytest.raises(NonFiniteError, match=r"step 5: 4 optimiser steps in a row"):
        trainer.fit()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000004"]      # rotation kept the finite ones
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_fp16_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 runs there with a GradScaler")
    reset_accelerate_state()
    cfg = TrainConfig(max_steps=2, batch_size=4, mixed_precision="fp16", num_workers=0)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        Trainer(toy.ToyMethod(), toy.ToyImages(8), cfg, OptimConfig(), tmp_path, {})


# ----------------------------------------------------------------------------------------------
# W&B: one run per run folder
# ----------------------------------------------------------------------------------------------

def test_a_resumed_run_continues_its_wandb_run(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    wandb = {"logger.kind": "wandb", "logger.wandb_mode": "offline"}
    finetune(ft(synth_root, tmp_path, **wandb, **{"train.max_steps": 2}))
    run_id = json.loads((tmp_path / "ft" / "wandb_run.json").read_text())["id"]
    finetune(ft(synth_root, tmp_path, **wandb, **{"train.max_steps": 4,
                                                  "train.resume": "latest"}))
    import wandb as wandb_module
    wandb_module.teardown()                     # flush the offline records, as an exit would
    assert json.loads((tmp_path / "ft" / "wandb_run.json").read_text())["id"] == run_id
    # One offline record per launch, both of the same run id. The record file is named by the
    # id; the folder is too, but W&B appends "-1" to it when both launches start in the same
    # second, so the folder name is not what to check.
    records = sorted((tmp_path / "ft" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [r.name for r in records] == [f"run-{run_id}.wandb"] * 2

