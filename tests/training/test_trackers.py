"""Trackers through Accelerate: W&B offline, TensorBoard, none; PNG grids always written."""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from ddpm_landmarks.config.training import LoggerConfig
from ddpm_landmarks.training.engine import reset_accelerate_state
from ddpm_landmarks.training.trackers import (
    flatten_config,
    log_image_grids,
    tracker_setup,
)
from ddpm_landmarks.utils.wandb import resolve_wandb_mode

CONFIG = {"data": {"image_size": 64, "scale": [0.9, 1.1], "root": ""}, "model": {"preset": "tiny"},
          "fewshot": {"budget": None}}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No credentials, no network, no writes outside tmp_path; fresh Accelerate state."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    yield
    reset_accelerate_state()


def grids():
    return {"samples": torch.rand(4, 1, 16, 16), "recon/rgb": torch.rand(3, 20, 24)}


def run(kind: str, run_dir, **logger):
    log_with, init_kwargs = tracker_setup(LoggerConfig(kind=kind, **logger), run_dir, "test-run")
    accelerator = Accelerator(log_with=log_with, project_dir=str(run_dir), cpu=True)
    accelerator.init_trackers("ddpm-landmarks-test", config=flatten_config(CONFIG),
                              init_kwargs=init_kwargs)
    for step in range(3):
        accelerator.log({"loss": 1.0 / (step + 1)}, step=step)
    written = log_image_grids(accelerator, grids(), step=2)
    accelerator.end_training()
    return accelerator, written


def test_flatten_config():
    assert flatten_config(CONFIG) == {"data.image_size": 64, "data.scale": "[0.9, 1.1]",
                                      "data.root": "", "model.preset": "tiny",
                                      "fewshot.budget": None}


def test_wandb_mode_auto(monkeypatch, tmp_path):
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online"
    (tmp_path / "no_netrc").write_text("machine api.wandb.ai login user password abc\n")
    (tmp_path / "no_netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    (tmp_path / "no_netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"


def test_setup_kinds(tmp_path):
    assert tracker_setup(LoggerConfig(kind="none"), tmp_path) == (None, {})
    assert tracker_setup(LoggerConfig(kind="wandb", wandb_mode="disabled"), tmp_path) == (None, {})
    log_with, kwargs = tracker_setup(LoggerConfig(kind="wandb", entity="lab"), tmp_path / "r1")
    assert log_with == "wandb"
    assert kwargs["wandb"] == {"dir": str(tmp_path / "r1"), "name": "r1", "mode": "offline",
                               "entity": "lab"}


def test_wandb_offline_run_created(tmp_path):
    run_dir = tmp_path / "run"
    _, written = run("wandb", run_dir, wandb_mode="auto")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(run_dir.rglob("*"))
    assert list(runs[0].glob("*.wandb"))
    assert sorted(p.name for p in written) == ["recon_rgb_step00000002.png",
                                               "samples_step00000002.png"]


def test_tensorboard_event_file(tmp_path):
    run_dir = tmp_path / "run"
    run("tensorboard", run_dir)
    events = list((run_dir / "ddpm-landmarks-test").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_none_writes_pngs(tmp_path):
    import cv2
    run_dir = tmp_path / "run"
    accelerator, written = run("none", run_dir)
    assert accelerator.trackers == []
    gray = cv2.imread(str(run_dir / "images" / "samples_step00000002.png"), cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2 and gray.shape == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 tiles
    rgb = cv2.imread(str(run_dir / "images" / "recon_rgb_step00000002.png"), cv2.IMREAD_UNCHANGED)
    assert rgb.shape == (20, 24, 3)
    assert not list(run_dir.glob("images/.*"))      # no temporary files left behind
