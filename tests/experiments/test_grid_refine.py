"""Grids with a refinement stage: each init applies to both stages (a ddpm init pretrains its
local network on crops, shared by its cells; scratch stays scratch), every cell is scored with
stage 1 and final side by side, the report has stage rows and a side-by-side table, a finished
grid is skipped, and a changed stage 2 re-runs only the refinement."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.experiments.grid import run_grid
from ddpm_landmarks.experiments.grid_plan import build_plan
from ddpm_landmarks.experiments.grid_schema import load_grid
from ddpm_landmarks.experiments.report import write_report

ROOT = Path(__file__).resolve().parents[2]
SYNTH = ["data.root={root}", "data.synthetic_num_images=40", "data.synthetic_image_size=128"]
FINETUNE = SYNTH + ["data.image_size=32", "train.max_steps=6", "train.eval_every=3",
                    "train.checkpoint_every=3", "train.num_workers=0", "train.batch_size=4",
                    "train.log_every=3", "fewshot.val_count=4", "eval.overlays=1",
                    "augment.flip_prob=0", "decoder.min_peak=0.0"]
PRETRAIN = SYNTH + ["data.image_size=32", "train.max_steps=4", "train.checkpoint_every=2",
                    "train.num_workers=0", "train.batch_size=4", "train.image_every=0"]
REFINE = ["refine.grid=128", "refine.patch_size=16", "model.preset=patch", "heatmap.sigma=1.5",
          "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
          "train.num_workers=0", "train.batch_size=8", "train.log_every=3", "eval.overlays=1",
          "augment.flip_prob=0", "decoder.min_peak=0.0"]


def experiment(tmp_path: Path, root: Path, refine_overrides=(), **extra) -> Path:
    fmt = [o.format(root=root) for o in PRETRAIN]
    spec = {
        "name": "g", "output_dir": str(tmp_path / "runs"), "budgets": [8], "seeds": [0],
        "finetune_overrides": [o.format(root=root) for o in FINETUNE],
        "pretrain_overrides": fmt,
        "refine": {"finetune": str(ROOT / "configs/finetune/synthetic.yaml"),
                   "overrides": REFINE + list(refine_overrides),
                   "pretrain_overrides": fmt + ["crops.grid=128", "data.image_size=16",
                                                "model.preset=patch"]},
        "launcher": {"kind": "inline"}, "logger": {"kind": "none"},
        "datasets": {"synthetic": {"finetune": str(ROOT / "configs/finetune/synthetic.yaml")}},
        "inits": {"ddpm": {"pretrain": str(ROOT / "configs/pretrain/synthetic.yaml"),
                           "refine_pretrain": str(ROOT / "configs/pretrain/synthetic.yaml")},
                  "scratch": {"overrides": ["model.preset=tiny"]},
                  "mean_shape": {}},
    }
    spec.update(extra)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_applies_each_init_to_both_stages(tmp_path):
    plan = build_plan(load_grid(experiment(tmp_path, tmp_path / "syn")))
    cells = {c.init: c for c in plan.cells}
    assert cells["mean_shape"].refine is None
    ddpm, scratch = cells["ddpm"].refine, cells["scratch"].refine
    # ddpm: stage 1 from the whole-image pretraining, stage 2 from the crop pretraining.
    local = ddpm.pretraining
    assert local is not None and local.name.startswith("ddpm-refine-")
    assert local.config.crops.grid == 128 and local.config.model.preset == "patch"
    assert ddpm.config.model.init == "pretrained"
    assert ddpm.config.model.pretrained_path == str(local.run_dir / "export")
    assert cells["ddpm"].config.model.pretrained_path != ddpm.config.model.pretrained_path
    assert (scratch.config.model.init, scratch.config.model.pretrained_path) == ("scratch", "")
    # Stage 1's data grid and split, the cell's seed, the cell's run as stage 1.
    for cell in (cells["ddpm"], cells["scratch"]):
        r = cell.refine.config
        assert r.refine.enabled and r.refine.stage1 == str(cell.run_dir)
        assert (r.data.image_size, r.fewshot.budget, r.fewshot.val_count, r.train.seed) == \
            (32, 8, 4, 0)
        assert cell.refine.run_dir.parent == cell.run_dir
        assert local in cell.dependencies or cell.init == "scratch"


def test_plan_errors(tmp_path):
    path = experiment(tmp_path, tmp_path / "syn",
                      inits={"ddpm": {"pretrain": str(ROOT / "configs/pretrain/synthetic.yaml")}})
    with pytest.raises(ConfigError, match="refine_pretrain"):
        load_grid(path)
    path = experiment(tmp_path, tmp_path / "syn",
                      inits={"c": {"kind": "checkpoint", "checkpoint": "x"}})
    with pytest.raises(ConfigError, match="no refinement stage"):
        load_grid(path)


def test_refine_grid_end_to_end_and_rerun_of_stage_2_only(tmp_path, torch_one_thread):
    root = tmp_path / "syn"
    outcome = run_grid(load_grid(experiment(tmp_path, root)))
    assert sorted(outcome["done"]) == ["synthetic-ddpm-N8-s0", "synthetic-mean_shape-N8-s0",
                                       "synthetic-scratch-N8-s0"]
    plan = build_plan(load_grid(experiment(tmp_path, root)))
    cells = {c.init: c for c in plan.cells}
    status = json.loads((cells["ddpm"].run_dir / "cell.json").read_text())
    assert status["refine_hash"] == cells["ddpm"].refine.key
    assert status["stage1_metrics"]["mre"] > 0 and status["metrics"]["mre"] > 0
    eval_dir = Path(status["eval_dir"])
    assert eval_dir.parent == cells["ddpm"].refine.run_dir
    assert json.loads((eval_dir / "stage1" / "metrics.json").read_text())["mre"] == \
        pytest.approx(status["stage1_metrics"]["mre"])

    md = (tmp_path / "runs" / "g" / "report" / "summary.md").read_text()
    assert "ddpm (stage 1)" in md and "ddpm (final)" in md and "mean_shape |" in md
    assert "## Refinement: stage 1 and final" in md
    assert (tmp_path / "runs" / "g" / "report" / "label_efficiency.png").is_file()

    assert run_grid(load_grid(experiment(tmp_path, root)))["skipped"] == sorted(outcome["done"])
    # Another stage 2: only the refinement runs again (stage 1 resumes as finished).
    stage1_metrics = (cells["scratch"].run_dir / "metrics.jsonl").read_text()
    changed = load_grid(experiment(tmp_path, root, refine_overrides=["refine.iterations=2"]))
    again = run_grid(changed)
    assert sorted(again["done"]) == ["synthetic-ddpm-N8-s0", "synthetic-scratch-N8-s0"]
    assert again["skipped"] == ["synthetic-mean_shape-N8-s0"]
    new = {c.init: c for c in build_plan(changed).cells}["scratch"]
    assert new.refine.run_dir != cells["scratch"].refine.run_dir and new.refine.run_dir.is_dir()
    kept = (cells["scratch"].run_dir / "metrics.jsonl").read_text()
    assert kept.splitlines()[:len(stage1_metrics.splitlines())] == stage1_metrics.splitlines()


def _cell(tmp: Path, seed: int, stage1: float, final: float):
    d = tmp / "cells" / f"ds-a-N10-s{seed}"
    d.mkdir(parents=True)
    metrics = {"unit": "mm", "sd": 1.0, "n": 19, "missed": 0, "thresholds": [2.0]}
    record = {"dataset": "ds", "init": "a", "budget": 10, "budget_label": "10", "seed": seed,
              "status": "done", "name": d.name, "train_images": 10,
              "metrics": {**metrics, "mre": final, "median": final, "sdr": {"2.0": 80.0}},
              "stage1_metrics": {**metrics, "mre": stage1, "median": stage1,
                                 "sdr": {"2.0": 50.0}}}
    (d / "cell.json").write_text(json.dumps(record))


def test_report_rows_per_stage(tmp_path):
    _cell(tmp_path, 0, 2.0, 1.5)
    _cell(tmp_path, 1, 3.0, 1.7)
    result = write_report(tmp_path)
    groups = {g["stage"]: g for g in result["groups"]}
    assert groups["stage 1"]["mre"] == pytest.approx(2.5)
    assert groups["final"]["mre"] == pytest.approx(1.6)
    assert groups["final"]["mre_sd_over_seeds"] == pytest.approx(np.sqrt(0.02))
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| ds | a | 10 | 2/2 | 2.50 ± 0.71 | 1.60 ± 0.14 | 50.0 ± 0.0 | 80.0 ± 0.0 |" in md


def test_dry_run_counts_the_refinement_runs(tmp_path, capsys):
    from ddpm_landmarks.cli.main import main as cli_main
    path = experiment(tmp_path, tmp_path / "syn")
    assert cli_main(["grid", str(path), "--dry-run", "--only", "scratch"]) == 0
    out = capsys.readouterr().out
    assert "| refine | synthetic-scratch-N8-s0:refine | 6 |" in out
    assert "16 px patches, patch" in out


def test_refinement_key_is_unchanged_by_the_share_radius_field(tmp_path):
    """A refinement without shared patches keeps the key it had before refine.share_radius
    existed (its finished runs are found again); shared patches are another run."""
    import hashlib

    from ddpm_landmarks.config.schema import to_dict
    from ddpm_landmarks.experiments.shared_jobs import config_key

    def plan_of(*overrides):
        path = experiment(tmp_path, tmp_path / "syn", refine_overrides=overrides)
        return {c.init: c.refine for c in build_plan(load_grid(path)).cells}["scratch"]

    plain = plan_of()
    data = to_dict(plain.config)
    data.pop("run"), data.pop("logger")
    data["refine"].pop("share_radius")
    data["model"].pop("landmark_embedding")
    data["train"].pop("resume")
    old = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    assert config_key(plain.config) == plain.key == old
    shared = plan_of("refine.supervise=visible", "refine.share_radius=4")
    assert shared.key != plain.key and shared.run_dir != plain.run_dir
