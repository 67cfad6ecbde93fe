"""Few-shot landmark probe during pretraining (training/probe.py, pretrain.py's probe.every)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.finetune import LossConfig
from ddpm_landmarks.config.pretrain import PretrainConfig, ProbeConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.heatmap_dataset import HeatmapDataset
from ddpm_landmarks.data.registry import build_dataset
from ddpm_landmarks.heatmaps.losses import heatmap_loss
from ddpm_landmarks.pretrain import pretrain
from ddpm_landmarks.training.checkpoint import read_trainer_state
from ddpm_landmarks.training.engine import reset_accelerate_state
from ddpm_landmarks.training.probe import LandmarkProbe, fit_linear_head

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pretrain" / "synthetic.yaml"
SIMCLR_CONFIG = ROOT / "configs" / "pretrain" / "simclr_synthetic.yaml"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def overrides(data_root: Path, tmp_path: Path, **extra) -> list[str]:
    # 24 synthetic images of 64 px: 16 in 'train', 8 in 'test1'.
    values = {
        "data.root": str(data_root), "data.image_size": 64,
        "data.synthetic_num_images": 24, "data.synthetic_image_size": 64,
        "data.synthetic_num_landmarks": 4,
        "train.batch_size": 4, "train.max_steps": 5, "train.num_workers": 0,
        "train.checkpoint_every": 2, "train.image_every": 0, "train.log_every": 1,
        "probe.every": 2, "probe.num_train": 6, "probe.num_val": 6,
        "run.output_dir": str(tmp_path / "runs"), "run.name": "pre",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def probe_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "probe/mre" in r]


def reset_accelerate() -> None:
    reset_accelerate_state()


def test_ddpm_pretraining_logs_the_probe_keeps_the_best_export_and_resumes(data_root, tmp_path):
    cfg = load_config(CONFIG, overrides(data_root, tmp_path), cls=PretrainConfig)
    summary = pretrain(cfg)
    run = tmp_path / "runs" / "pre"
    rows = probe_rows(run)
    assert [r["step"] for r in rows] == [2, 4, 5]          # every 2 steps and at the end
    for r in rows:
        assert r["probe/mre"] > 0 and {"probe/sdr@1", "probe/mre_best"} <= set(r)
    mres = [r["probe/mre"] for r in rows]
    assert summary["best"] == min(mres)
    assert summary["best_step"] == rows[mres.index(min(mres))]["step"]
    assert not summary["stopped_early"]
    assert read_trainer_state(run / "checkpoints" / "step_00000004")["best_value"] == min(mres[:2])

    # best/ is the DDPM export at the best probe step: probing it again gives that value.
    from ddpm_landmarks.methods.ddpm import DDPMMethod, load_exported
    unet, _, _ = load_exported(run / "best")
    method = DDPMMethod(cfg)
    probe = LandmarkProbe(cfg.probe, cfg.data, method.probe_features)
    assert probe(unet.eval())["probe/mre"] == pytest.approx(summary["best"], rel=1e-5)

    # Resume: the best value and best/ carry over; new probes at 6 and 7.
    reset_accelerate()
    cfg = load_config(CONFIG, overrides(data_root, tmp_path, **{"train.max_steps": 7,
                                                                "train.resume": "latest"}),
                      cls=PretrainConfig)
    resumed = pretrain(cfg)
    rows = probe_rows(run)
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 7]
    mres = [r["probe/mre"] for r in rows]
    assert resumed["best"] == min(mres)
    assert rows[3]["probe/mre_best"] == min(mres[:4])       # includes the first run's values
    assert (run / "best" / "config.json").is_file()


def test_ssl_pretraining_probe_exports_the_encoder_to_best(data_root, tmp_path):
    extra = {"train.max_steps": 2, "probe.every": 1, "train.checkpoint_every": 0}
    assert cli_main(["pretrain", str(SIMCLR_CONFIG), *overrides(data_root, tmp_path, **extra)]) == 0
    run = tmp_path / "runs" / "pre"
    assert [r["step"] for r in probe_rows(run)] == [1, 2]
    meta = json.loads((run / "best" / "encoder.json").read_text())
    assert meta["method"] == "simclr" and (run / "best" / "encoder.safetensors").is_file()


def _probe_data(data_root: Path, image_size: int) -> DataConfig:
    return DataConfig(dataset="synthetic", root=str(data_root), image_size=image_size,
                      synthetic_num_images=24, synthetic_image_size=64,
                      synthetic_num_landmarks=4)


def test_probe_is_deterministic_and_leaves_the_rng_alone(data_root):
    from ddpm_landmarks.methods.ddpm import DDPMMethod
    cfg = load_config(CONFIG, [f"data.root={data_root}", "data.synthetic_num_images=24",
                               "data.synthetic_image_size=64", "data.synthetic_num_landmarks=4"],
                      cls=PretrainConfig)
    method = DDPMMethod(cfg)
    probe = LandmarkProbe(ProbeConfig(num_train=6, num_val=6), cfg.data, method.probe_features)
    state = torch.get_rng_state()
    first, second = probe(method.model), probe(method.model)
    assert torch.equal(state, torch.get_rng_state())
    assert method.model.training                            # mode restored
    assert first["probe/mre"] == second["probe/mre"]
    assert first["probe/train_loss"] == second["probe/train_loss"]


def oracle_features(data: DataConfig, sigma: float):
    """features_fn whose features are each image's own target heatmaps, looked up by pixels."""
    from ddpm_landmarks.config.common import AugmentConfig, HeatmapConfig
    pool = build_dataset(data).split(data.train_split)
    items = HeatmapDataset(pool, data, AugmentConfig(), HeatmapConfig(sigma=sigma), train=False)
    lookup = {}
    for i in range(len(items)):
        item = items[i]
        lookup[item["image"].numpy().tobytes()] = item["heatmaps"]

    def features(_model, images):
        return [torch.stack([lookup[im.cpu().numpy().tobytes()] for im in images])]

    return features


def test_features_that_carry_the_landmarks_probe_far_better_than_random_ones(data_root):
    """On a 32 px grid of 64 px images, so the errors are right only if points are mapped back
    to original pixels (and converted to mm) as evaluation does."""
    data = _probe_data(data_root, image_size=32)
    cfg = ProbeConfig(num_train=6, num_val=6, sigma=1.5)

    def noise(_model, images):
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((images.shape[0], 16, 32, 32), generator=gen)]

    dummy = torch.nn.Conv2d(1, 1, 1)
    good = LandmarkProbe(cfg, data, oracle_features(data, 1.5))(dummy)
    bad = LandmarkProbe(cfg, data, noise)(dummy)
    assert good["probe/mre"] < 0.1, good                    # mm; 1 grid px = 1 mm here
    assert good["probe/sdr@1"] == 100.0
    assert bad["probe/mre"] > 2.0 and bad["probe/mre"] > 20 * good["probe/mre"], bad


def test_oracle_probe_on_isbi_is_right_in_millimetres(shared_data):
    """Real cephalograms (1935 x 2400 px at 0.1 mm, stretched to 64 x 64: a grid pixel is
    ~3.4 mm): landmark-carrying features must come back to within a fraction of a mm."""
    data = DataConfig(dataset="isbi2015", root=str(shared_data / "isbi2015"), image_size=64)
    probe = LandmarkProbe(ProbeConfig(num_train=10, num_val=10), data, oracle_features(data, 2.0))
    values = probe(torch.nn.Conv2d(1, 1, 1))
    assert values["probe/mre"] < 0.5, values
    assert {"probe/sdr@2", "probe/sdr@2.5", "probe/sdr@3", "probe/sdr@4"} <= set(values)


def test_linear_head_is_the_minimiser_of_the_heatmap_mse():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(3, 5, 8, 8, generator=gen)
    targets = torch.rand(3, 2, 8, 8, generator=gen) ** 4
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss_cfg, ridge = LossConfig(name="mse", foreground_weight=5.0), 0.01
    weight, bias = fit_linear_head(features, targets, mask, loss_cfg, ridge)
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()

    def objective(w, b):
        pred = torch.nn.functional.conv2d(features, w[:, :, None, None], b)
        # Per landmark: its loss + ridge |w_k|^2; summed over the K = 2 landmarks.
        return 2 * heatmap_loss("mse", pred, targets, mask, **loss_cfg.kwargs()) + \
            ridge * (w ** 2).sum()

    value = objective(weight, bias)
    value.backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5
    with torch.no_grad():                                   # and any step away is worse
        assert objective(weight + 0.01, bias) > value and objective(weight, bias - 0.01) > value


@pytest.mark.parametrize("override, message", [
    ("probe.num_train=100", "probe.num_train"),
    ("probe.split=test1", "probe.split"),
    ("probe.ridge=0", "probe.ridge"),
    ("train.early_stopping_patience=2", "train.early_stopping_patience"),
])
def test_bad_probe_configs_are_clear_errors(data_root, tmp_path, capsys, override, message):
    assert cli_main(["pretrain", str(CONFIG), *overrides(data_root, tmp_path), override]) == 2
    assert message in capsys.readouterr().err
