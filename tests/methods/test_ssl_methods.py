"""SSL baselines (SimCLR, MoCo v2, MoCo v3) in the shared engine: config defaults, the x-ray
views, the export contract, MoCo v3's step count, learning on real x-rays, 2 processes, CLI."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.pretrain import (
    PretrainConfig,
    SSLConfig,
    ViewConfig,
    resolve_ssl_config,
)
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.ssl_views import (
    TwoViewImages,
    check_views,
    crop_matrix,
    random_resized_crop_box,
)
from ddpm_landmarks.data.transforms import apply_matrix
from ddpm_landmarks.data.unlabeled import MixedPools, UnlabeledPool
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS, SSL_METHODS
from ddpm_landmarks.methods.ssl_base import cosine_momentum
from ddpm_landmarks.models.encoder_weights import load_ssl_encoder
from ddpm_landmarks.training.checkpoint import list_checkpoints, read_trainer_state
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "accelerate_scripts"
sys.path.insert(0, str(SCRIPTS))
from ssl_two_procs import (  # noqa: E402
    DIM,
    TEMPERATURE,
    ToyViews,
    fixed_inputs,
    simclr_method,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small_cfg(method: str, **ssl) -> PretrainConfig:
    cfg = PretrainConfig(method=method)
    cfg.data.image_size = 32
    cfg.train.batch_size = 2
    cfg.ssl.queue_size = 4
    for key, value in ssl.items():
        setattr(cfg.ssl, key, value)
    return cfg


# -- config --------------------------------------------------------------------------------------

def test_registry_and_method_defaults():
    assert set(SSL_METHODS) <= set(PRETRAINING_METHODS) and PretrainConfig().method == "ddpm"
    expect = {"simclr": (0.5, 128, 512, None), "moco_v2": (0.2, 128, 512, 0.999),
              "moco_v3": (1.0, 256, 1024, 0.99)}            # resnet18: 512 channels
    for name, (temperature, proj, hidden, momentum) in expect.items():
        ssl = resolve_ssl_config(name, SSLConfig(), encoder_channels=512)
        assert (ssl.temperature, ssl.proj_dim, ssl.hidden_dim, ssl.momentum) == \
            (temperature, proj, hidden, momentum)
    ssl = resolve_ssl_config("simclr", SSLConfig(temperature=0.1), encoder_channels=2048)
    assert (ssl.temperature, ssl.hidden_dim) == (0.1, 2048)          # set values are kept


# -- views ---------------------------------------------------------------------------------------

def test_crop_box_and_matrix():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, w, h = random_resized_crop_box(rng, 64, (0.3, 1.0), (0.75, 4 / 3))
        assert 0 <= x0 and x0 + w <= 64 + 1e-9 and 0 <= y0 and y0 + h <= 64 + 1e-9
        assert 0.3 - 1e-9 <= w * h / 64 ** 2 <= 1 + 1e-9
        assert 0.75 - 1e-9 <= w / h <= 4 / 3 + 1e-9
    # The crop's corner pixel edges land on the grid's: (x0, y0) edge -> (0, 0) edge.
    box = (10.0, 20.0, 32.0, 16.0)
    corners = np.array([[10 - 0.5, 20 - 0.5], [42 - 0.5, 36 - 0.5]])   # pixel-centre coords
    assert np.allclose(apply_matrix(crop_matrix(box, 64), corners), [[-0.5, -0.5], [63.5, 63.5]])


def _pool(tmp_path: Path, n: int = 4) -> MixedPools:
    """Images whose left half is bright: a flip is visible."""
    folder = tmp_path / "pool"
    folder.mkdir()
    image = np.zeros((80, 60), np.uint8)
    image[:, :30] = 200
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        cv2.imwrite(str(paths[-1]), image)
    return MixedPools([UnlabeledPool(name="p", root=folder, paths=paths, weight=1.0)])


def test_two_views_dataset(tmp_path):
    pools = _pool(tmp_path)
    dataset = TwoViewImages(pools, 32, ViewConfig(), seed=0)
    item = dataset[0]
    assert set(item) == {"view1", "view2"}
    for view in item.values():
        assert view.shape == (1, 32, 32) and view.dtype == torch.float32
        assert view.min() >= -1 and view.max() <= 1
    assert not torch.equal(item["view1"], item["view2"])             # independent draws
    again = TwoViewImages(pools, 32, ViewConfig(), seed=0)[0]
    assert torch.equal(again["view1"], item["view1"])                 # seeded
    # No flip unless asked for: with geometry and intensity off, left stays bright.
    still = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_deg=0.0, jitter_prob=0.0,
                 blur_prob=0.0, noise_std=0.0)
    plain = TwoViewImages(pools, 32, ViewConfig(**still), seed=0)[0]["view1"][0]
    assert plain[:, :12].mean() > 0.5 and plain[:, 20:].mean() < -0.9
    flipped = TwoViewImages(pools, 32, ViewConfig(**still, flip_prob=1.0), seed=0)[0]["view1"][0]
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    with pytest.raises(ConfigError, match="crop_scale"):
        check_views(ViewConfig(crop_scale=(0.5, 1.5)))


# -- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, in_channels", [("simclr", 1), ("moco_v2", 1), ("moco_v3", 3)])
def test_export_loads_strictly_into_smp_unet_encoder(tmp_path, method, in_channels):
    import segmentation_models_pytorch as smp
    torch.manual_seed(0)
    m = PRETRAINING_METHODS[method](small_cfg(method, in_channels=in_channels))
    with torch.no_grad():                        # momentum copies differ from the online one
        for name, p in m.model.named_parameters():
            if not p.requires_grad:
                p.add_(1.0)
    config_dict = {"method": method, "note": "resolved config"}
    m.export(m.model, tmp_path / "export", config_dict)
    m.export(m.model, tmp_path / "export", config_dict)               # replaces atomically
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "encoder.json",
                                                     "encoder.safetensors"]
    assert json.loads((out / "encoder.json").read_text()) == {
        "format": "ddpm_landmarks.ssl_encoder", "version": 1, "encoder": "resnet18",
        "in_channels": in_channels, "method": method, "input_norm": "none"}
    from safetensors.torch import load_file
    state = load_file(str(out / "encoder.safetensors"))
    unet_encoder = smp.Unet("resnet18", in_channels=in_channels, encoder_weights=None).encoder
    # nn.Module.load_state_dict: smp encoders override it (dropping "fc." keys, returning None).
    result = torch.nn.Module.load_state_dict(unet_encoder, state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    online = m.model.encoder.state_dict()
    assert all(torch.equal(state[k], online[k]) for k in online)      # the online encoder
    encoder, meta = load_ssl_encoder(out)
    assert meta["method"] == method
    x = torch.rand(2, in_channels, 32, 32)
    m.model.encoder.eval()
    encoder.eval()
    assert torch.equal(encoder(x)[-1], m.model.encoder(x)[-1])
    assert (tmp_path / "export" / "config.yaml").read_text().startswith("method: " + method)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]   # no leftovers


# -- MoCo v3 step count --------------------------------------------------------------------------

def _train_toy(method: str, run_dir: Path, steps: int, grad_accum: int = 1, resume: str = "",
               max_steps: int | None = None):
    from ddpm_landmarks.config.training import OptimConfig, TrainConfig
    from ddpm_landmarks.training.engine import Trainer
    reset_accelerate_state()
    cfg = small_cfg(method, hidden_dim=32)
    cfg.train = TrainConfig(max_steps=steps, batch_size=2, grad_accum=grad_accum, ema=False,
                            checkpoint_every=2, num_workers=0, log_every=1, image_every=0,
                            resume=resume, seed=0)
    torch.manual_seed(0)
    m = PRETRAINING_METHODS[method](cfg)
    m.max_steps = max_steps or steps          # the momentum cosine's length
    trainer = Trainer(m, ToyViews(), cfg.train, OptimConfig(lr=1e-3, warmup_steps=0), run_dir,
                      {"method": method, "steps": max_steps})
    trainer.fit()
    return trainer, trainer.accelerator.unwrap_model(trainer.model)


def test_moco_v3_counts_optimizer_steps_and_resumes_its_schedule(tmp_path):
    # 2 steps x 2 micro-batches, checkpoint; resume to 3: the step buffer is checkpointed and
    # counts optimiser steps, not micro-batches; the momentum follows the cosine over 3 steps.
    trainer, model = _train_toy("moco_v3", tmp_path / "run", 2, grad_accum=2, max_steps=3)
    assert model.step.item() == 2
    trainer, model = _train_toy("moco_v3", tmp_path / "run", 3, grad_accum=2, resume="latest")
    assert model.step.item() == 3
    logged = [json.loads(line)["train/momentum"]
              for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([cosine_momentum(s, 3, 0.99) for s in range(3)])


# -- learning on real x-rays ---------------------------------------------------------------------

# Mild views and a small batch: 30 CPU steps from random init. MoCo v2's first step meets a
# queue of random vectors (loss ~0.2, far below chance), so its losses count from step 2, when
# the queue (one batch) holds real keys.
LEARN = {"simclr": {"optim.lr": 0.001},
         "simclr_v2": {"optim.lr": 0.001},
         "moco_v2": {"optim.lr": 0.001, "ssl.queue_size": 8, "ssl.momentum": 0.99},
         "moco_v3": {"optim.lr": 0.003},
         "dino": {"optim.lr": 0.001, "ssl.proj_dim": 256, "ssl.views.local_crops": 2,
                  "ssl.views.local_size": 32}}


@pytest.mark.parametrize("method", SSL_METHODS)
def test_loss_decreases_on_real_xrays(shared_data, tmp_path, method):
    import shutil

    from ddpm_landmarks.data.pretrain_sets import build_pretrain_dataset
    from ddpm_landmarks.pretrain import resolve_method
    from ddpm_landmarks.training.engine import Trainer
    pool = tmp_path / "isbi"
    pool.mkdir()
    for i in range(1, 49):                                            # ISBI Train 001-048
        shutil.copy(shared_data / "isbi2015" / "images" / f"{i:03d}.png", pool)
    overrides = {
        "method": method, "data.image_size": 64, "unlabeled.labelled_splits": "[]",
        "unlabeled.pools": f"[{{path: {pool}}}]",
        "ssl.views.crop_scale": "[0.9, 1.0]", "ssl.views.rotation_deg": 2,
        "ssl.views.jitter_prob": 0.3, "ssl.views.blur_prob": 0, "ssl.views.noise_std": 0.01,
        "train.batch_size": 8, "train.max_steps": 30, "train.num_workers": 0,
        "train.log_every": 1, "train.checkpoint_every": 0, "train.image_every": 0,
        "train.ema": "false", "optim.warmup_steps": 5, "optim.max_grad_norm": "null",
        "logger.kind": "none", **LEARN[method]}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=PretrainConfig)
    cfg = resolve_method(cfg, None)
    torch.manual_seed(0)
    trainer = Trainer(PRETRAINING_METHODS[method](cfg), build_pretrain_dataset(cfg, views=cfg.ssl.views),
                      cfg.train, cfg.optim, tmp_path / "run", {})
    trainer.fit()
    # DINO: the KL to the teacher (its loss also holds the teacher's entropy, which centering
    # and sharpening move on their own).
    losses = [h["train/kl" if method == "dino" else "train/loss"] for h in trainer.history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    if method == "moco_v2":
        losses = losses[1:]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Measured (seeds 0 and 1): simclr -35 %, moco_v2 -16..-30 %, moco_v3 -9..-10 %.
    assert last < 0.95 * first, (method, [round(x, 3) for x in losses])


# -- two processes -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 3 samples == 1 process x 6 (tests/accelerate_scripts/ssl_two_procs.py):
    SimCLR's gathered negatives give the global loss and gradient, also through DDP and
    SimCLRMethod.loss; MoCo v3 with gathered keys; MoCo v2's shuffled keys and queue; and two
    engine steps of MoCo v2 (DDP, shuffling BN, queue) end with identical queues and weights."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf")}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(SCRIPTS / "ssl_two_procs.py"), str(tmp_path), "--engine",
           "moco_v2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    from ddpm_landmarks.methods.moco_v2 import Queue
    from ddpm_landmarks.methods.moco_v3 import moco_v3_loss
    from ddpm_landmarks.methods.simclr import nt_xent_loss
    data = fixed_inputs()

    # SimCLR, fixed embeddings: mean of the per-process losses = the global loss; each
    # process's gradient / 2 (DDP's average) = the global gradient of its rows.
    z1, z2 = data["z1"].clone().requires_grad_(True), data["z2"].clone().requires_grad_(True)
    loss = nt_xent_loss(z1, z2, TEMPERATURE)
    loss.backward()
    assert (r0["simclr_loss"] + r1["simclr_loss"]) / 2 == pytest.approx(loss.item(), abs=1e-6)
    for key, full in (("simclr_grad1", z1.grad), ("simclr_grad2", z2.grad)):
        assert torch.allclose(torch.cat([r0[key], r1[key]]) / 2, full, atol=1e-6)

    # SimCLRMethod.loss through DDP: parameter gradients (averaged by DDP) = one process.
    model = tiny_model()
    loss, _ = simclr_method().loss(model, {"view1": data["x1"], "view2": data["x2"]})
    loss.backward()
    assert (r0["ddp_loss"] + r1["ddp_loss"]) / 2 == pytest.approx(loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(r0["ddp_grads"][name], p.grad, atol=1e-6), name
        assert torch.equal(r0["ddp_grads"][name], r1["ddp_grads"][name])

    # MoCo v3: keys gathered without gradient; query gradients / 2 = the global ones.
    q = data["z1"].clone().requires_grad_(True)
    loss = moco_v3_loss(q, data["z2"], TEMPERATURE)
    loss.backward()
    assert (r0["moco_v3_loss"] + r1["moco_v3_loss"]) / 2 == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(torch.cat([r0["moco_v3_grad"], r1["moco_v3_grad"]]) / 2, q.grad,
                          atol=1e-6)
    assert torch.equal(r0["moco_v3_keys"], data["z2"])

    # MoCo v2: shuffled keys come back in order; each process embedded samples of both.
    keys = torch.cat([r0["shuffled_keys"], r1["shuffled_keys"]])
    assert torch.allclose(keys, data["x1"].flatten(1) * 2 + 1)
    seen0 = {round(v, 6) for v in r0["seen"].flatten(1)[:, 0].tolist()}
    firsts = [round(v, 6) for v in data["x1"].flatten(1)[:, 0].tolist()]
    assert seen0 & set(firsts[:3]) and seen0 & set(firsts[3:])
    torch.manual_seed(3)
    queue = Queue(8, DIM)
    queue.enqueue(data["z1"])                        # the global batch, in process order
    for r in (r0, r1):
        assert torch.equal(r["queue_keys"], queue.keys) and r["queue_ptr"].item() == 6

    # Engine, MoCo v2 on 2 processes: same logged loss, queue and weights on both.
    e0, e1 = r0["engine"], r1["engine"]
    assert e0["step"] == e1["step"] == 2 and math.isfinite(e0["loss"])
    assert e0["buffers"]["queue.ptr"].item() == 0    # 2 steps x 4 keys into a queue of 8
    assert torch.equal(e0["buffers"]["queue.keys"], e1["buffers"]["queue.keys"])
    assert torch.equal(e0["encoder_conv1"], e1["encoder_conv1"])


# -- command line --------------------------------------------------------------------------------

def _cli_overrides(tmp_path: Path, **extra) -> list[str]:
    values = {"data.root": str(tmp_path / "synthetic"), "data.image_size": 32,
              "data.synthetic_num_images": 24, "data.synthetic_image_size": 64,
              "data.synthetic_num_landmarks": 4, "train.batch_size": 4, "train.max_steps": 3,
              "train.num_workers": 0, "train.checkpoint_every": 2, "train.image_every": 2,
              "train.log_every": 1, "ssl.hidden_dim": 64,
              "run.output_dir": str(tmp_path / "runs"), "run.name": "ssl"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_cli_simclr_end_to_end_and_resume(tmp_path):
    config = ROOT / "configs" / "pretrain" / "simclr_synthetic.yaml"
    assert cli_main(["pretrain", str(config), *_cli_overrides(tmp_path)]) == 0
    run = tmp_path / "runs" / "ssl"
    saved = load_config(run / "config.yaml", cls=PretrainConfig)
    assert saved.method == "simclr" and saved.ssl.temperature == 0.5
    assert (run / "images" / "views_step00000002.png").is_file()
    encoder, meta = load_ssl_encoder(run / "export")
    assert meta["method"] == "simclr" and meta["encoder"] == "resnet18"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]

    reset_accelerate_state()
    args = _cli_overrides(tmp_path, **{"train.max_steps": 5, "train.resume": "latest"})
    assert cli_main(["pretrain", str(config), *args]) == 0
    assert read_trainer_state(run / "checkpoints" / "step_00000005")["step"] == 5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]                                   # continued, not restarted


@pytest.mark.parametrize("config, override, message", [
    ("moco_v2_synthetic.yaml", "ssl.queue_size=30", "multiple of the global batch"),
    ("simclr_synthetic.yaml", "method=byol", "unknown method"),
    ("simclr_synthetic.yaml", "ssl.encoder=resnet7", "ssl.encoder"),
])
def test_cli_errors(tmp_path, capsys, config, override, message):
    args = _cli_overrides(tmp_path) + [override]
    assert cli_main(["pretrain", str(ROOT / "configs" / "pretrain" / config), *args]) == 2
    assert message in capsys.readouterr().err
