"""--dry-run cost (experiments/cost.py): FLOPs counted on the meta device against a hand count,
and the shipped paper grid planned and costed without running a network."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm_landmarks.experiments.cost import count_flops, estimate, format_estimate
from ddpm_landmarks.experiments.grid_plan import build_plan
from ddpm_landmarks.experiments.grid_schema import load_grid

ROOT = Path(__file__).resolve().parents[2]


def test_meta_flop_count_by_hand():
    """A bias-free Linear(I -> O) on a batch of B, input without gradient: 2 B I O forward,
    2 B I O for the weight gradient. Built on the meta device: nothing is allocated."""
    b, i, o = 4, 1000, 3000

    def make(device):
        layer = torch.nn.Linear(i, o, bias=False)
        assert layer.weight.device.type == "meta"
        x = torch.zeros(b, i, device=device)
        return lambda: layer(x).sum().backward()
    assert count_flops(make) == 4 * b * i * o


def test_paper_grid_dry_run_plans_every_cell(monkeypatch, tmp_path):
    """Every cell of experiments/paper.yaml planned, and its DDPM jobs costed (FLOPs on the
    meta device, GPU hours at the file's assumptions, no network timed), without data or
    weights. (The whole `--dry-run` counts 9 networks, DenseNet161s among them: ~1 min here.)"""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_LANDMARKS_DATA", str(tmp_path / "no_data"))
    plan = build_plan(load_grid(ROOT / "experiments" / "paper.yaml"))
    assert len(plan.cells) == 3 * 9 * 6 and len(plan.pretrainings) == 12
    plan.pretrainings = [p for p in plan.pretrainings if p.method == "ddpm"]
    plan.cells = [c for c in plan.cells if c.init in ("ddpm", "mean_shape")]
    est = estimate(plan, set(), set())
    rows = {r["name"]: r for r in est["rows"]}
    assert len(rows) == 3 + 3 * 6                                  # no mean-shape rows
    assert all(r["minutes"] is None and r["gpu_hours"] > 0 for r in rows.values())
    ddpm = rows["isbi2015-ddpm-N50-s42"]
    assert (ddpm["steps"], ddpm["images"]) == (800, 800 * 16)     # 200 epochs x 4 steps
    assert rows["hand_dha-ddpm-Nall-s42"]["steps"] == 200 * 35     # 550 released images
    assert sorted(r["steps"] for r in est["rows"] if r["kind"] == "pretrain") == [6000, 8000,
                                                                                    8000]
    cost = plan.grid.cost
    assert ddpm["gpu_hours"] == pytest.approx(
        ddpm["tflop"] * 1e12 / (cost.gpu_peak_tflops * 1e12 * cost.gpu_efficiency) / 3600)
    out = format_estimate(plan, est)
    assert "GPU hours, assuming a NVIDIA A100 at 156 TFLOP/s" in out and "35 %" in out
