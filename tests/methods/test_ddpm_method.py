"""DDPM method: the loss maths by hand, a short training run, image grids, atomic export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import to_dict
from ddpm_landmarks.methods.base import Method
from ddpm_landmarks.methods.ddpm import (
    DDPMMethod,
    diffusion_loss,
    load_exported,
    snr_of,
)
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _cfg(size: int = 32, **diffusion) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.data.image_size = size
    cfg.diffusion.num_train_timesteps = 500           # the paper's T
    cfg.diffusion.sample_steps = 3
    cfg.diffusion.num_samples = 4
    for key, value in diffusion.items():
        setattr(cfg.diffusion, key, value)
    return cfg


def _smooth_batch(n: int = 8, size: int = 32) -> torch.Tensor:
    """Smooth synthetic images in [-1, 1]: products of low-frequency sines and cosines."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = [torch.sin(math.pi * (k + 1) * xx / 2) * torch.cos(math.pi * yy * (k % 3 + 1) / 2)
            for k in range(n)]
    return 0.8 * torch.stack(imgs)[:, None]


# -- pure maths ---------------------------------------------------------------------------------

def test_snr_of_matches_definition():
    alphas_cumprod = torch.tensor([0.99, 0.5, 0.2, 0.01])
    t = torch.tensor([0, 1, 3])
    expected = torch.tensor([0.99 / 0.01, 1.0, 0.01 / 0.99])
    assert torch.allclose(snr_of(alphas_cumprod, t), expected, rtol=1e-5)


# pred - target = [[1, 2], [3, 4]] -> per-sample MSE [2.5, 12.5]; SNR [0.5, 10]; gamma 5.
_HAND = {
    (None, "epsilon"): (2.5 + 12.5) / 2,
    ("g", "epsilon"): (2.5 * 1.0 + 12.5 * 5 / 10) / 2,                  # min(snr, g) / snr
    ("g", "v_prediction"): (2.5 * 0.5 / 1.5 + 12.5 * 5 / 11) / 2,       # min(snr, g) / (snr + 1)
    ("g", "sample"): (2.5 * 0.5 + 12.5 * 5) / 2,                        # min(snr, g)
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss_by_hand(prediction_type, gamma):
    target = torch.tensor([[0.5, -1.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    pred = target + torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2)
    snr = torch.tensor([0.5, 10.0])
    key = (None, "epsilon") if gamma is None else ("g", prediction_type)
    loss = diffusion_loss(pred, target, snr, prediction_type, gamma)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(_HAND[key], rel=1e-6)


def test_min_snr_epsilon_is_finite_at_zero_snr():
    loss = diffusion_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1),
                          "epsilon", 5.0)
    assert loss.item() == pytest.approx(1.0)


def test_schedule_and_v_target_by_hand():
    method = DDPMMethod(_cfg())
    sched = method.scheduler
    betas = np.linspace(1e-4, 0.02, 500)
    alphas_cumprod = np.cumprod(1 - betas)
    assert np.allclose(sched.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-5)

    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 249, 499])
    a = torch.tensor(alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(sched.get_velocity(x0, noise, t), v, atol=1e-6)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(sched.add_noise(x0, noise, t), x_t, atol=1e-6)


# -- the method ---------------------------------------------------------------------------------

def test_registry_and_protocol():
    torch.manual_seed(0)
    method = PRETRAINING_METHODS["ddpm"](_cfg())
    assert isinstance(method, Method)
    assert method.model.config.sample_size == 32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_runs_and_is_reproducible(prediction_type):
    torch.manual_seed(0)
    method = DDPMMethod(_cfg(prediction_type=prediction_type, min_snr_gamma=5.0))
    batch = _smooth_batch(4)
    l1, logs = method.loss(method.model, batch, torch.Generator().manual_seed(3))
    l2, _ = method.loss(method.model, batch, torch.Generator().manual_seed(3))
    assert torch.isfinite(l1) and l1.item() == l2.item()
    assert set(logs) == {"loss", "t_mean"} and 0 <= logs["t_mean"] < 500
    l1.backward()


def test_loss_decreases_with_training():
    torch.manual_seed(0)
    method = DDPMMethod(_cfg())
    batch = _smooth_batch(8)

    def fixed_loss() -> float:        # same t and noise every time: a fair before/after
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            return method.loss(method.model, batch.repeat(4, 1, 1, 1), gen)[0].item()

    before = fixed_loss()
    opt = torch.optim.AdamW(method.model.parameters(), lr=1e-3)
    for _ in range(60):
        loss, _ = method.loss(method.model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    print(f"fixed-noise loss before {before:.4f} after 60 AdamW steps {after:.4f}")
    assert after < 0.3 * before


def test_log_images_grids():
    torch.manual_seed(0)
    method = DDPMMethod(_cfg())
    method.model.train()
    grids = method.log_images(method.model, _smooth_batch(6))
    assert method.model.training                       # mode restored
    # make_grid, padding 2: 4 samples of 32 px in one row; 4 rows x 7 columns of reconstructions.
    assert grids["samples"].shape == (3, 36, 4 * 34 + 2)
    assert grids["reconstructions"].shape == (3, 4 * 34 + 2, 7 * 34 + 2)
    for grid in grids.values():
        assert grid.dtype == torch.float32 and grid.min() >= 0 and grid.max() <= 1
    again = method.log_images(method.model, _smooth_batch(6))
    assert torch.equal(grids["samples"], again["samples"])   # fixed seed: comparable over training


def test_export_reload_identical(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(prediction_type="v_prediction")
    method = DDPMMethod(cfg)
    out = tmp_path / "export"
    method.export(method.model, out, to_dict(cfg))
    assert (out / "diffusion_pytorch_model.safetensors").is_file()

    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 300])
    reloaded = UNet2DModel.from_pretrained(out).eval()
    method.model.eval()
    with torch.no_grad():
        assert torch.equal(method.model(x, t).sample, reloaded(x, t).sample)

    model, sched, config = load_exported(out)
    assert isinstance(sched, DDPMScheduler)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.num_train_timesteps == 500
    assert config == to_dict(cfg)


def test_export_overwrites_atomically(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg()
    method = DDPMMethod(cfg)
    out = tmp_path / "export"
    method.export(method.model, out, {"version": 1})
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.01)
    method.export(method.model, out, {"version": 2})

    assert [p.name for p in tmp_path.iterdir()] == ["export"]   # no temp or old folders left
    model, _, config = load_exported(out)
    assert config == {"version": 2}
    for (name, a), b in zip(method.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class _Recorder(torch.nn.Module):
    """Stands in for the U-Net: records what the loss feeds it, predicts zero noise."""
    config = type("Config", (), {"in_channels": 1})()       # grayscale, not folded

    def forward(self, x_t, t, class_labels=None):
        self.x_t, self.t = x_t.detach().clone(), t.detach().clone()
        return type("Out", (), {"sample": torch.zeros_like(x_t)})()


def test_min_timestep_and_unit_image_range_as_the_released_code():
    """t from [min_timestep, T); image_range=unit diffuses (x + 1) / 2: for x = -1 everywhere,
    x_t differs from the signed one by exactly -sqrt(alpha_bar_t) (same noise, same t)."""
    method = DDPMMethod(_cfg(num_train_timesteps=3, min_timestep=1))
    rec, batch = _Recorder(), -torch.ones(64, 1, 4, 4)
    method.loss(rec, batch, torch.Generator().manual_seed(0))
    assert set(rec.t.tolist()) == {1, 2}                 # never 0, both others drawn
    signed_x_t, t = rec.x_t, rec.t
    unit = DDPMMethod(_cfg(num_train_timesteps=3, min_timestep=1, image_range="unit"))
    unit.loss(rec, batch, torch.Generator().manual_seed(0))
    assert torch.equal(rec.t, t)
    alpha_bar = unit.scheduler.alphas_cumprod[t].float()
    assert torch.allclose(signed_x_t - rec.x_t, -alpha_bar.sqrt().view(-1, 1, 1, 1).expand_as(
        rec.x_t), atol=1e-6)
    with pytest.raises(ValueError, match="min_timestep=3 must be in"):
        DDPMMethod(_cfg(num_train_timesteps=3, min_timestep=3))
