"""Two-stage runs end to end on synthetic data: a deliberately coarse stage 1 (a 16 px grid,
8 stored pixels per grid pixel) and a refinement run on full-resolution patches, through the
same engine; stage 2 lowers the error; `evaluate` (CLI) reports both stages, `predict` (CLI)
writes the final points with stage 1's beside them and agrees with evaluate; resume; and the
errors of a refinement run that does not match its stage 1."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.finetune import finetune
from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune" / "synthetic.yaml"
COMMON = ["data.synthetic_num_images=60", "data.synthetic_image_size=128",
          "data.synthetic_num_landmarks=6", "fewshot.budget=20", "fewshot.val_count=8",
          "train.num_workers=0", "train.log_every=10", "train.checkpoint_every=1000",
          "optim.warmup_steps=10", "logger.kind=none", "model.init=scratch",
          "model.pretrained_path=", "augment.flip_prob=0"]


def stage1_overrides(root: Path, out: Path) -> list[str]:
    return COMMON + [f"data.root={root}", f"run.output_dir={out}", "run.name=coarse",
                     "data.image_size=16", "model.preset=tiny", "heatmap.sigma=1.0",
                     "train.max_steps=60", "train.batch_size=8", "train.eval_every=30",
                     "optim.lr=0.002", "optim.head_lr=0.005"]


def refine_overrides(root: Path, out: Path, stage1: Path, **extra) -> list[str]:
    values = {"refine.enabled": "true", "refine.stage1": stage1, "refine.grid": 128,
              "refine.patch_size": 24, "refine.iterations": 2, "model.preset": "patch",
              "heatmap.sigma": 1.5, "train.max_steps": 60, "train.batch_size": 16,
              "train.eval_every": 30, "optim.lr": 0.002, "optim.head_lr": 0.005,
              "run.name": "fine", **extra}
    return COMMON + [f"data.root={root}", f"run.output_dir={out}", "data.image_size=16"] + \
        [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, torch_one_thread):
    """(synthetic root, runs folder, stage-1 run, refinement run)."""
    tmp = tmp_path_factory.mktemp("refine")
    root, out = tmp / "syn", tmp / "runs"
    reset_accelerate_state()
    finetune(load_config(FINETUNE, stage1_overrides(root, out), cls=FinetuneConfig))
    reset_accelerate_state()
    finetune(load_config(FINETUNE, refine_overrides(root, out, out / "coarse"),
                         cls=FinetuneConfig))
    reset_accelerate_state()
    return root, out, out / "coarse", out / "fine"


def test_stage2_lowers_the_error_of_a_coarse_stage1(two_stage, capsys):
    _, _, stage1_dir, run_dir = two_stage
    for name in ("stage1/regressor.safetensors", "stage1/config.yaml", "best/regressor.json",
                 "export/regressor.json", "refine.json", "split_train_ids.txt"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "refine.json").read_text())
    assert len(info["iterations"]) == 6 and set(info["iterations"]) <= {0, 1, 2}
    assert info["unit_per_patch_pixel"] == pytest.approx(0.5)       # 0.5 mm/px, grid = image
    assert cli_main(["evaluate", str(run_dir), "--split", "test1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1" in printed and "final" in printed
    metrics = json.loads((run_dir / "eval_test1" / "metrics.json").read_text())
    stage1 = json.loads((run_dir / "eval_test1" / "stage1" / "metrics.json").read_text())
    assert metrics["stage1"]["mre"] == pytest.approx(stage1["mre"])
    # The one-stage evaluation of the stage-1 run scores exactly stage 1 of the pipeline.
    alone = evaluate_run(load_trained_run(stage1_dir, device="cpu"), "test1")
    assert alone["mre"] == pytest.approx(stage1["mre"], rel=1e-6)
    # A 16 px grid is 8 stored pixels (4 mm) per grid pixel: the refinement must win clearly.
    assert metrics["mre"] < 0.7 * stage1["mre"], (metrics["mre"], stage1["mre"])
    rows = list(csv.DictReader(open(run_dir / "eval_test1" / "refine_per_landmark.csv")))
    assert [int(r["iterations"]) for r in rows] == info["iterations"]


def test_evaluation_logs_both_stages_to_wandb_offline(two_stage, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    _, _, _, run_dir = two_stage
    assert cli_main(["evaluate", str(run_dir), "--split", "test1", "--device", "cpu",
                     "--out", str(tmp_path / "eval"), "logger.kind=wandb",
                     "logger.wandb_mode=offline"]) == 0
    import wandb
    wandb.teardown()                   # flushes the offline record (as the CLI's exit does)
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert records
    logged = max(records, key=lambda p: p.stat().st_mtime).read_bytes()
    assert b"eval/stage1/mre" in logged and b"eval/refine_per_landmark" in logged
    assert b"eval/mre" in logged


def test_predict_writes_both_stages_and_agrees_with_evaluate(two_stage, tmp_path):
    root, _, _, run_dir = two_stage
    run = load_trained_run(run_dir, device="cpu")
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    test = build_dataset(run.cfg.data).split("test1")
    images = tmp_path / "images"
    images.mkdir()
    for r in test.records[:5]:
        shutil.copy(r.image_path, images / Path(r.image_path).name)
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(run_dir), "--images", str(images), "--out", str(out),
                     "--device", "cpu", "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {"stage1_x", "stage1_y"} <= set(rows[0])
    by_image = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    for i, r in enumerate(test.records[:5]):
        mine = sorted(by_image[Path(r.image_path).name], key=lambda x: int(x["landmark_index"]))
        final = np.array([[float(x["x"]), float(x["y"])] for x in mine])
        first = np.array([[float(x["stage1_x"]), float(x["stage1_y"])] for x in mine])
        # The synthetic files are their own original grid: the same points as evaluate.
        np.testing.assert_allclose(final, summary["predictions"][i], atol=1e-3)
        assert not np.allclose(final, first)


def test_uncertainty_of_the_refined_points(two_stage, tmp_path):
    """calibrate, evaluate and predict on a two-stage run: scores of the final points (the
    patch heatmap's spread where refined), conformal radii from the run's own calibration
    images, the same radii from predict as from evaluate; no tta score for two stages."""
    root, _, _, run_dir = two_stage
    shutil.copytree(run_dir, tmp_path / "fine")
    run_dir = tmp_path / "fine"
    assert cli_main(["calibrate", str(run_dir), "--device", "cpu", "--alphas", "0.2"]) == 0
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["model"]["stage1_sha256"] and cal["model"]["refine"]["enabled"] is True
    run = load_trained_run(run_dir, device="cpu")
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    info = json.loads((run_dir / "refine.json").read_text())
    refined = np.array(info["iterations"]) > 0
    assert summary["radii"] is not None and "stage1" in summary
    region = summary["uncertainty"]["regions"]["spread"][0.2]
    assert 0.0 < region["overall"] <= 1.0 and np.isfinite(region["mean_radius"])
    header = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"uncertainty_spread", "radius@0.2", "flag@0.2"} <= set(header)
    if refined.any() and (~refined).any():
        # The spread of refined landmarks is read on the fine patch grid: smaller than stage
        # 1's 4 mm grid pixels give for the landmarks kept at stage 1.
        spread = summary["scales"]["spread"]
        assert np.nanmedian(spread[:, refined]) < np.nanmedian(spread[:, ~refined])
    test = build_dataset(run.cfg.data).split("test1")
    images = tmp_path / "images"
    images.mkdir()
    for r in test.records[:3]:
        shutil.copy(r.image_path, images / Path(r.image_path).name)
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(run_dir), "--images", str(images), "--out", str(out),
                     "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {"radius@0.2", "stage1_x"} <= set(rows[0])
    radius = summary["radii"]["spread"][0.2]
    for i, r in enumerate(test.records[:3]):
        mine = sorted((x for x in rows if x["image"] == Path(r.image_path).name),
                      key=lambda x: int(x["landmark_index"]))
        # predict knows no spacing: the spread radius is in the file's pixels (0.5 mm each).
        assert {x["radius_unit"] for x in mine} == {"px"}
        np.testing.assert_allclose([0.5 * float(x["radius@0.2"]) for x in mine], radius[i],
                                   rtol=1e-3)
    with pytest.raises(ConfigError, match="not built for refinement runs"):
        evaluate_run(run, "test1", tmp_path / "eval_tta", tta_score=True)


def test_refinement_run_resumes_and_refuses_mismatches(two_stage, tmp_path):
    root, out, stage1_dir, run_dir = two_stage
    # A finished run resumed: nothing to train, refine.json written again, same choice.
    before = json.loads((run_dir / "refine.json").read_text())["iterations"]
    finetune(load_config(FINETUNE, refine_overrides(root, out, stage1_dir) +
                         ["train.resume=latest"], cls=FinetuneConfig))
    assert json.loads((run_dir / "refine.json").read_text())["iterations"] == before

    def refused(*extra, stage1=stage1_dir) -> str:
        reset_accelerate_state()
        cfg = load_config(FINETUNE, refine_overrides(root, tmp_path, stage1, **{
            "run.name": "bad"}) + list(extra), cls=FinetuneConfig)
        with pytest.raises(ConfigError) as err:
            finetune(cfg)
        assert not (tmp_path / "bad" / "config.yaml").exists()     # nothing written
        return str(err.value)

    assert "split" in refused("fewshot.draw=1")
    assert "data.image_size" in refused("data.image_size=32")
    assert "refinement run" in refused(stage1=run_dir)
    assert "refine.stage1" in refused(stage1=tmp_path / "nothing")
    assert "refine.stage1" in refused("refine.stage1=")


def test_landmark_index_as_input_variant(two_stage, tmp_path):
    """refine.landmark_input=embedding: one output channel and the landmark index embedded with
    the time step; it trains through the same engine, saves, loads and refines."""
    import torch

    root, out, stage1_dir, _ = two_stage
    reset_accelerate_state()
    finetune(load_config(FINETUNE, refine_overrides(
        root, tmp_path, stage1_dir, **{"run.name": "emb", "refine.landmark_input": "embedding",
                                       "train.max_steps": 10, "train.eval_every": 10}),
        cls=FinetuneConfig))
    run = load_trained_run(tmp_path / "emb", device="cpu")
    local = run.refine.model
    assert local.num_landmarks == 1 and local.cfg.landmark_embedding == 6
    assert local.unet.class_embedding.weight.abs().sum() > 0        # trained from zero
    x = torch.zeros(2, 1, 24, 24)
    with torch.no_grad():
        a, b = local(x, torch.tensor([0, 0])), local(x, torch.tensor([0, 3]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    assert np.isfinite(summary["mre"]) and "stage1" in summary
    reset_accelerate_state()
    with pytest.raises(ConfigError, match="landmark_input=embedding"):
        finetune(load_config(FINETUNE, refine_overrides(
            root, tmp_path, stage1_dir, **{"run.name": "emb2", "refine.landmark_input":
                                           "embedding", "model.arch": "smp_unet",
                                           "refine.patch_size": 32}),
            cls=FinetuneConfig))


def test_shared_patch_variant(two_stage, tmp_path):
    """refine.supervise=visible + refine.share_radius: it trains through the same engine, reads
    nearby landmarks on one patch (fewer forwards than landmarks), and still clearly lowers
    the coarse stage 1's error. The synthetic landmarks are look-alike blobs: on a shared patch
    the stage-1 prior (prior_weight) tells them apart (without it, 15 px of error here)."""
    root, _, stage1_dir, _ = two_stage
    reset_accelerate_state()
    finetune(load_config(FINETUNE, refine_overrides(
        root, tmp_path, stage1_dir, **{"run.name": "shared", "refine.supervise": "visible",
                                       "refine.grid": 64, "refine.share_radius": 11,
                                       "refine.prior_weight": 1.0, "refine.iterations": 1,
                                       "refine.select": "all"}),
        cls=FinetuneConfig))
    run = load_trained_run(tmp_path / "shared", device="cpu")
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # Grid 64 on the 128 px images: the landmarks (34 px = 17 patch px apart or more) pair up.
    assert metrics["refine_share_radius"] == 11
    assert 1 <= metrics["refine_patches_per_image"] < 5               # 6 landmarks, 1 iteration
    assert summary["mre"] < 0.7 * summary["stage1"]["mre"], (summary["mre"],
                                                              summary["stage1"]["mre"])


def test_folded_local_network_variant(two_stage, tmp_path):
    """model.preset=patch_fold, the default local network (models/unet.py, the patch folded
    2 x 2): it trains through the same engine, saves and loads with its fold, and clearly
    lowers the coarse stage 1's error on full-resolution patches."""
    root, _, stage1_dir, _ = two_stage
    reset_accelerate_state()
    finetune(load_config(FINETUNE, refine_overrides(
        root, tmp_path, stage1_dir, **{"run.name": "folded", "model.preset": "patch_fold"}),
        cls=FinetuneConfig))
    run = load_trained_run(tmp_path / "folded", device="cpu")
    assert run.refine.model.fold == 2 and run.refine.model.unet.config.in_channels == 4
    summary = evaluate_run(run, "test1", tmp_path / "eval")
    assert summary["mre"] < 0.7 * summary["stage1"]["mre"], (summary["mre"],
                                                              summary["stage1"]["mre"])
