"""Few-shot fine-tuning end to end: synthetic accuracy from a short DDPM pretraining, every
loss / timestep / freezing option trains, resume, landmark-count errors, flip TTA, and on real
ISBI x-rays the fine-tuned model beats the mean-shape predictor."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.finetune import finetune
from ddpm_landmarks.pretrain import pretrain
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune" / "synthetic.yaml"
PRETRAIN = ROOT / "configs" / "pretrain" / "synthetic.yaml"

# No torch_one_thread here: these runs load data in the main process (num_workers=0), so both
# cores go to the model (1.6x faster than one thread on the 2-core CI machine).


def as_overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


# A synthetic set at 128 px (fast to read), shared by every test of the module.
SYNTH = {"data.synthetic_num_images": 120, "data.synthetic_image_size": 128,
         "data.synthetic_num_landmarks": 8, "data.image_size": 64}
NO_AUGMENT = {"augment.rotation_deg": 0.0, "augment.scale": "[1.0, 1.0]",
              "augment.translate": 0.0, "augment.flip_prob": 0.0, "augment.brightness": 0.0,
              "augment.contrast": 0.0, "augment.gamma": "[1.0, 1.0]", "augment.noise_std": 0.0}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def pretrained(synth_root, tmp_path_factory) -> Path:
    """A short DDPM pretraining of the tiny U-Net on the synthetic 'train' split."""
    reset_accelerate_state()
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(PRETRAIN, as_overrides({
        **SYNTH, "data.root": synth_root, "train.max_steps": 40, "train.batch_size": 8,
        "train.num_workers": 0, "train.image_every": 0, "train.checkpoint_every": 0,
        "train.log_every": 20, "optim.warmup_steps": 10, "run.output_dir": out,
        "run.name": "pre"}), cls=PretrainConfig)
    pretrain(cfg)
    reset_accelerate_state()
    return out / "pre" / "export"


def ft_config(synth_root, out, pretrained=None, **values) -> FinetuneConfig:
    base = {**SYNTH, "data.root": synth_root, "train.num_workers": 0, "train.log_every": 1,
            "logger.kind": "none", "run.output_dir": out, "run.name": "ft"}
    if pretrained is None:
        base.update({"model.init": "scratch", "model.pretrained_path": "''"})
    else:
        base["model.pretrained_path"] = pretrained
    base.update(values)
    return load_config(FINETUNE, as_overrides(base), cls=FinetuneConfig)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


# ----------------------------------------------------------------------------------------------
# Accuracy on held-out synthetic images, through the command line
# ----------------------------------------------------------------------------------------------

def test_synthetic_finetune_from_pretraining_reaches_bound(synth_root, pretrained, tmp_path,
                                                          capsys):
    overrides = as_overrides({
        **SYNTH, "data.root": synth_root, "model.pretrained_path": pretrained,
        "train.max_steps": 150, "train.eval_every": 50, "train.checkpoint_every": 0,
        "train.num_workers": 0, "run.output_dir": tmp_path, "run.name": "ft"})
    assert cli_main(["finetune", str(FINETUNE), *overrides]) == 0
    run = tmp_path / "ft"
    assert (run / "best" / "regressor.json").is_file() and (run / "export").is_dir()
    assert len((run / "split_train_ids.txt").read_text().split()) == 50
    # With a W&B logger (offline here: no API key) the evaluation is also a W&B run.
    assert cli_main(["evaluate", str(run), "--split", "test1", "logger.kind=wandb",
                     "logger.wandb_mode=offline"]) == 0
    out = capsys.readouterr().out
    # The wandb service writes the offline record asynchronously; shutting it down (what the CLI's
    # process exit does) flushes it before we read it.
    import wandb
    wandb.teardown()
    records = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    logged = records[0].read_bytes()
    assert b"eval/per_landmark" in logged and b"eval/overlays" in logged and b"eval/mre" in logged
    metrics = json.loads((run / "eval_test1" / "metrics.json").read_text())
    assert metrics["n"] == 40 * 8 and metrics["unit"] == "mm" and metrics["split"] == "test1"
    assert f"{metrics['mre']:.3f}" in out
    # Stated bound: MRE below 0.5 original pixel of the 128-px images (0.5 mm/px at 256 px
    # means 1 mm per pixel here; one model-grid pixel at 64 px is 2 mm), i.e. a quarter of a
    # model-grid pixel: only sub-pixel decoding mapped back exactly gets there. Measured
    # 0.15 px; the mean shape of the same 50 images is at ~6 px.
    mre_px = metrics["mre"] / 1.0
    print(f"synthetic test1, 64 px grid, 50 labels, 150 steps: MRE {mre_px:.3f} px of the "
          f"128-px images, median {metrics['median']:.3f}")
    assert metrics["missed"] == 0
    assert mre_px < 0.5, metrics
    overlays = sorted(p.name for p in (run / "eval_test1" / "overlays").iterdir())
    assert len(overlays) == 6 and overlays[0].startswith("best_")
    header = (run / "eval_test1" / "predictions.csv").read_text().splitlines()[0]
    assert header.split(",")[9:11] == ["confidence", "uncertainty_peak"]   # + the scores


# ----------------------------------------------------------------------------------------------
# Every option trains
# ----------------------------------------------------------------------------------------------

OPTIONS = {
    "mse": {"loss.name": "mse"},
    "bce": {"loss.name": "bce", "optim.lr": 2e-3, "optim.head_lr": 1e-2},
    "softmax_ce": {"loss.name": "softmax_ce"},
    "channel_ce": {"loss.name": "channel_ce"},
    "drop_timestep": {"model.timestep_mode": "drop"},
    "noised_input_t50": {"model.noise_input": True, "model.timestep": 50},
    "freeze_encoder": {"model.freeze": "encoder"},
    "probe_small_head": {"model.freeze": "unet", "model.head": "small"},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains(name, synth_root, pretrained, tmp_path):
    cfg = ft_config(synth_root, tmp_path, pretrained, **NO_AUGMENT, **{
        "fewshot.budget": 8, "fewshot.val_policy": "none", "train.batch_size": 4,
        "train.max_steps": 16, "train.eval_every": 0, "train.checkpoint_every": 0,
        "optim.warmup_steps": 0, "optim.schedule": "constant"}, **OPTIONS[name])
    finetune(cfg)
    curve = losses(tmp_path / "ft")
    assert len(curve) == 16 and np.isfinite(curve).all()
    assert np.mean(curve[-4:]) < 0.9 * np.mean(curve[:4]), curve
    trained = load_file(tmp_path / "ft" / "export" / "regressor.safetensors")
    start = load_file(Path(pretrained) / "diffusion_pytorch_model.safetensors")
    if name == "freeze_encoder":
        for key in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"):
            assert torch.equal(trained[f"unet.{key}"], start[key])
        assert not torch.equal(trained["unet.up_blocks.0.resnets.0.conv1.weight"],
                               start["up_blocks.0.resnets.0.conv1.weight"])
    if name == "probe_small_head":
        body = [k for k in start if not k.startswith("conv_out.")]
        assert all(torch.equal(trained[f"unet.{k}"], start[k]) for k in body)
    if name == "drop_timestep":
        assert not any("time_emb_proj" in k or "time_embedding" in k for k in trained)


# ----------------------------------------------------------------------------------------------
# Resume, landmark-count errors, flip TTA
# ----------------------------------------------------------------------------------------------

def test_resumed_finetune_equals_uninterrupted(synth_root, tmp_path):
    common = {**NO_AUGMENT, "fewshot.budget": 12, "train.batch_size": 4, "train.eval_every": 4,
              "train.checkpoint_every": 4, "optim.warmup_steps": 2, "optim.schedule": "plateau",
              "optim.plateau_patience": 1}
    finetune(ft_config(synth_root, tmp_path / "full", **common, **{"train.max_steps": 12}))
    reset_accelerate_state()
    # The cut run stops at step 8 (as if killed after its checkpoint), then resumes.
    finetune(ft_config(synth_root, tmp_path / "cut", **common, **{"train.max_steps": 8}))
    reset_accelerate_state()
    summary = finetune(ft_config(synth_root, tmp_path / "cut", **common,
                                 **{"train.max_steps": 12, "train.resume": "latest"}))
    assert summary["step"] == 12
    full = load_file(tmp_path / "full" / "ft" / "export" / "regressor.safetensors")
    cut = load_file(tmp_path / "cut" / "ft" / "export" / "regressor.safetensors")
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=1e-5, atol=1e-6)
    best = [json.loads(r) for r in (tmp_path / "cut" / "ft" / "metrics.jsonl").read_text()
            .splitlines() if "val/mre" in r]
    full_best = [json.loads(r) for r in (tmp_path / "full" / "ft" / "metrics.jsonl").read_text()
                 .splitlines() if "val/mre" in r]
    assert [b["val/mre"] for b in best] == pytest.approx([b["val/mre"] for b in full_best])


def test_checkpoint_of_another_landmark_count_is_a_clear_error(synth_root, tmp_path):
    common = {"fewshot.budget": 8, "fewshot.val_policy": "none", "train.batch_size": 4,
              "train.max_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2}
    finetune(ft_config(synth_root, tmp_path, **common))
    reset_accelerate_state()
    other = {"data.root": tmp_path / "six", "data.synthetic_num_landmarks": 6,
             "data.synthetic_num_images": 24}
    # The data's shape is part of the config: refused before anything is built or written.
    with pytest.raises(ConfigError, match="data.synthetic_num_landmarks: 8 -> 6"):
        finetune(ft_config(synth_root, tmp_path, **{**common, **other, "train.max_steps": 4,
                                                    "train.resume": "latest"}))
    from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
    run = load_trained_run(tmp_path / "ft", overrides=as_overrides(other))
    with pytest.raises(DataError, match="predicts 8 landmarks but dataset synthetic:test1 has 6"):
        evaluate_run(run, "test1")


def test_flip_tta_is_flip_equivariant(synth_root, tmp_path):
    """TTA(mirror(image)) must equal mirror(TTA(image)) with the labels swapped, whatever the
    model: the averaged heatmap is symmetric by construction only with the right mirroring."""
    from ddpm_landmarks.config.finetune import RegressorConfig
    from ddpm_landmarks.data.synthetic import flip_permutation
    from ddpm_landmarks.inference.predictor import HeatmapPredictor
    from ddpm_landmarks.models.registry import build_regressor
    cfg = ft_config(synth_root, tmp_path, **{"decoder.min_peak": 0.0})
    torch.manual_seed(0)
    model = build_regressor(RegressorConfig(init="scratch", preset="tiny"), 8, 64)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    perm = flip_permutation(8)
    tta = HeatmapPredictor(model, cfg.loss, cfg.heatmap, cfg.decoder, perm, flip_tta=True)
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    maps = tta.heatmaps(images)
    maps_mirrored = tta.heatmaps(torch.flip(images, dims=[-1]))
    torch.testing.assert_close(maps_mirrored, torch.flip(maps, dims=[-1])[:, perm],
                               rtol=1e-4, atol=1e-5)
    plain = HeatmapPredictor(model, cfg.loss, cfg.heatmap, cfg.decoder, perm, flip_tta=False)
    assert not torch.allclose(plain.heatmaps(images), maps)
    with pytest.raises(ValueError, match="permutation"):
        HeatmapPredictor(model, cfg.loss, cfg.heatmap, cfg.decoder, None, flip_tta=True)


# ----------------------------------------------------------------------------------------------
# Real x-rays: ISBI 2015 at 64 px with 20 labels beats the mean shape
# ----------------------------------------------------------------------------------------------

def test_isbi_64px_20_labels_beats_mean_shape(shared_data, tmp_path):
    from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
    overrides = {"data.dataset": "isbi2015", "data.root": shared_data / "isbi2015",
                 "data.image_size": 64, "augment.flip_prob": 0.0, "heatmap.sigma": 1.5,
                 "fewshot.budget": 20, "fewshot.val_policy": "none", "eval.sdr_thresholds":
                 "[2.0, 2.5, 3.0, 4.0]", "train.max_steps": 100, "train.eval_every": 0,
                 "train.checkpoint_every": 0, "train.batch_size": 8, "train.log_every": 20,
                 "optim.lr": 2e-3, "optim.head_lr": 2e-3, "optim.warmup_steps": 20}
    cfg = load_config(FINETUNE, as_overrides({
        **overrides, "model.init": "scratch", "model.pretrained_path": "''",
        "train.num_workers": 0, "logger.kind": "none", "run.output_dir": tmp_path,
        "run.name": "isbi"}), cls=FinetuneConfig)
    finetune(cfg)
    summary = evaluate_run(load_trained_run(tmp_path / "isbi"), "test1")
    assert summary["n"] == 150 * 19

    assert cli_main(["mean-shape", str(ROOT / "configs" / "isbi2015.yaml"), *as_overrides({
        "data.root": shared_data / "isbi2015", "data.image_size": 64, "fewshot.budget": 20,
        "fewshot.val_policy": "none", "run.output_dir": tmp_path, "run.name": "mean"})]) == 0
    baseline = json.loads((tmp_path / "mean" / "eval_test1" / "metrics.json").read_text())
    # Same 20 images (same seeded draw), same Test1, same ground truth (mean of the doctors).
    assert (tmp_path / "mean" / "split_train_ids.txt").read_text() == \
        (tmp_path / "isbi" / "split_train_ids.txt").read_text()
    print(f"ISBI Test1, 64 px, 20 labels: fine-tuned MRE {summary['mre']:.2f} mm "
          f"(missed {summary['missed']}), mean shape {baseline['mre']:.2f} mm")
    assert summary["mre"] < baseline["mre"]
    assert summary["sdr"][4.0] > baseline["sdr"]["4"]


# ----------------------------------------------------------------------------------------------
# accelerate launch: 2 processes x batch 2 == 1 process x batch 4, validation on rank 0
# ----------------------------------------------------------------------------------------------

def test_accelerate_launch_two_processes_matches_one_process(synth_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {**SYNTH, **NO_AUGMENT, "data.root": synth_root, "model.init": "scratch",
              "model.pretrained_path": "''", "fewshot.budget": 8, "train.max_steps": 4,
              "train.eval_every": 2, "train.early_stopping_patience": 5,
              "train.checkpoint_every": 2, "train.num_workers": 0, "train.log_every": 1,
              "logger.kind": "none", "run.output_dir": tmp_path}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf")}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "ddpm_landmarks.finetune", "--config", str(FINETUNE),
           *as_overrides({**common, "train.batch_size": 2, "run.name": "two"})]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finetune(load_config(FINETUNE, as_overrides({**common, "train.batch_size": 4,
                                                 "run.name": "one"}), cls=FinetuneConfig))

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r) for r in lines]

    two, one = rows("two"), rows("one")
    assert [r["train/loss"] for r in two if "train/loss" in r] == pytest.approx(
        [r["train/loss"] for r in one if "train/loss" in r], abs=1e-5)
    assert [r["val/mre"] for r in two if "val/mre" in r] == pytest.approx(
        [r["val/mre"] for r in one if "val/mre" in r], rel=1e-4)
    w_two = load_file(tmp_path / "two" / "export" / "regressor.safetensors")
    w_one = load_file(tmp_path / "one" / "export" / "regressor.safetensors")
    assert max((w_two[k] - w_one[k]).abs().max().item() for k in w_one) < 1e-5
    assert (tmp_path / "two" / "best" / "regressor.json").is_file()


def test_validation_never_abstains_on_a_negative_peak_channel(synth_root, tmp_path):
    """make_validator decodes without abstaining: a channel whose maximum is negative still
    counts in val/mre (val/missed 0), even under a config whose decoder.min_peak is 0.05."""
    from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
    from ddpm_landmarks.data.registry import build_dataset
    from ddpm_landmarks.heatmaps.targets import make_targets
    from ddpm_landmarks.training.validation import landmark_validator
    cfg = ft_config(synth_root, tmp_path, **{"decoder.min_peak": 0.05})
    pool = build_dataset(cfg.data).split("train")
    val = HeatmapDataset(pool.subset(pool.ids[:4]), cfg.data, cfg.augment, cfg.heatmap,
                         train=False)

    class Oracle(torch.nn.Module):
        """Gaussians at each image's true model-grid points; landmark 0 shifted below zero."""
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))
            self.maps = torch.stack([torch.from_numpy(make_targets(
                val[i]["landmarks"].numpy().astype(np.float64), (64, 64), cfg.heatmap)[0])
                for i in range(len(val))])
            self.maps[:, 0] -= 2.0                         # peak ~ -1
            self.calls = 0

        def forward(self, images):
            out = self.maps[self.calls:self.calls + len(images)]
            self.calls += len(images)
            return out + 0 * self.dummy

    values = landmark_validator(val, cfg)(Oracle())
    assert values["val/missed"] == 0
    assert values["val/mre"] < 0.1                          # every point, channel 0 included
    # The old rule (min_peak 0) would have dropped channel 0 of every image.
    from ddpm_landmarks.heatmaps.decoders import decode
    points, _ = decode(Oracle().maps, dataclasses.replace(cfg.decoder, min_peak=0.0))
    assert np.isnan(points[:, 0]).all() and np.isfinite(points[:, 1:]).all()


def test_documented_scratch_commands(synth_root, tmp_path, capsys):
    """configs/finetune/isbi2015.yaml's scratch baselines, on the synthetic set: with a
    pretrained_path that is no export, init=scratch is an error that says what to do, before
    anything is written; with model.pretrained_path= it builds model.preset and trains."""
    base = ["finetune", str(ROOT / "configs/finetune/isbi2015.yaml"), "data.dataset=synthetic",
            f"data.root={synth_root}", "data.image_size=64", "data.synthetic_num_images=120",
            "data.synthetic_image_size=128", "data.synthetic_num_landmarks=8",
            "eval.sdr_thresholds=null", "train.max_steps=2", "train.eval_every=0",
            "train.early_stopping_patience=0", "train.num_workers=0", "train.batch_size=4",
            "train.mixed_precision=no", "logger.kind=none", f"run.output_dir={tmp_path}",
            "model.init=scratch", "model.preset=small"]
    assert cli_main(base + ["run.name=missing"]) == 2
    err = capsys.readouterr().err
    assert "runs/pretrain_isbi2015/export' is not a DDPM pretraining export" in err
    assert "no such folder" in err and "set model.pretrained_path=''" in err
    assert not (tmp_path / "missing").exists()               # nothing written before the check
    reset_accelerate_state()
    assert cli_main(base + ["model.pretrained_path=", "run.name=ok"]) == 0
    weights = load_file(tmp_path / "ok" / "export" / "regressor.safetensors")
    # The small preset: four levels of 32/64/128/128 channels.
    assert weights["unet.down_blocks.3.resnets.0.conv1.weight"].shape[0] == 128
