"""HeatmapRegressor: pretrained / scratch init, timestep modes, freezing, save/load, a tiny fit."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.resnet import ResnetBlock2D

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.config.pretrain import ModelConfig
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import HeatmapRegressor, param_groups
from ddpm_landmarks.models.saved_regressor import load_regressor, save_regressor
from ddpm_landmarks.models.unet import build_unet

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE, K, B = 32, 3, 2


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(preset="tiny"), SIZE)
    path = tmp_path_factory.mktemp("run") / "export"
    unet.save_pretrained(path, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=500).save_pretrained(path / "scheduler")
    return path, {k: v.clone() for k, v in unet.state_dict().items()}


def cfg(export, **kw) -> RegressorConfig:
    return RegressorConfig(init="pretrained", pretrained_path=str(export[0]), **kw)


def images(seed=1):
    return torch.rand(B, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pretrained_shape_weights_and_head(export):
    model = build_regressor(cfg(export), K, SIZE)
    out = model(images())
    assert out.shape == (B, K, SIZE, SIZE)
    assert out.abs().max() < 0.5                        # near-zero head init
    ref = export[1]
    for k, v in model.unet.state_dict().items():
        if not k.startswith("conv_out."):
            assert torch.equal(v, ref[k]), k
    assert model.head.out_channels == K and model.head.weight.shape[:2] == (K, 32)
    assert ref["conv_out.weight"].shape[0] == 1


def test_small_head(export):
    model = build_regressor(cfg(export, head="small"), K, SIZE)
    assert isinstance(model.head, torch.nn.Sequential)
    assert model(images()).shape == (B, K, SIZE, SIZE)


def seeded(c: RegressorConfig) -> HeatmapRegressor:
    torch.manual_seed(5)                                 # same head init
    return build_regressor(c, K, SIZE).eval()


def test_fixed_vs_drop(export):
    x = images()
    with torch.no_grad():
        a0, a1 = seeded(cfg(export, timestep=0)), seeded(cfg(export, timestep=0))
        assert torch.equal(a0(x), a1(x))
        b = seeded(cfg(export, timestep=100))
        assert not torch.allclose(a0(x), b(x))
        d0 = seeded(cfg(export, timestep_mode="drop", timestep=0))
        d1 = seeded(cfg(export, timestep_mode="drop", timestep=300))
        assert not torch.allclose(d0(x), a0(x))
        assert torch.equal(d0(x), d1(x))
    blocks = [m for m in d0.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(m.time_emb_proj is None for m in blocks)
    assert not any("time_emb" in k for k in d0.state_dict())


def test_freeze_encoder_one_step(export):
    model = build_regressor(cfg(export, freeze="encoder"), K, SIZE)
    u = model.unet
    for mod in (u.conv_in, u.time_embedding, u.down_blocks, u.mid_block):
        assert all(not p.requires_grad for p in mod.parameters())
    assert all(p.requires_grad for p in u.up_blocks.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-2, 0.0))
    model(images()).pow(2).mean().backward()   # target 0: any non-zero output gives gradients
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith(("unet.down_blocks", "unet.mid_block", "unet.conv_in", "unet.time_emb")):
            assert not changed, k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet.up_blocks"))
    assert not torch.equal(before["unet.conv_out.weight"], after["unet.conv_out.weight"])


def test_freeze_unet_probe_and_param_groups(export):
    model = build_regressor(cfg(export, freeze="unet"), K, SIZE)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet.conv_out.weight", "unet.conv_out.bias"}
    groups = param_groups(model, 1e-4, 1e-3, 0.01)
    assert {g["name"] for g in groups} == {"head", "head_no_decay"}
    assert all(g["lr"] == 1e-3 for g in groups)

    full = build_regressor(cfg(export), K, SIZE)
    groups = {g["name"]: g for g in param_groups(full, 1e-4, 1e-3, 0.01)}
    assert groups["body"]["lr"] == 1e-4 and groups["head"]["lr"] == 1e-3
    assert groups["body"]["weight_decay"] == 0.01 and groups["body_no_decay"]["weight_decay"] == 0
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(full.parameters()))
    torch.optim.AdamW(list(groups.values()))            # accepted by the optimiser


def test_scratch_same_architecture_new_weights(export):
    pre = build_regressor(cfg(export), K, SIZE).state_dict()
    torch.manual_seed(123)
    scratch = build_regressor(dataclasses.replace(cfg(export), init="scratch"), K, SIZE).state_dict()
    assert pre.keys() == scratch.keys()
    assert all(pre[k].shape == scratch[k].shape for k in pre)
    assert not torch.equal(pre["unet.down_blocks.0.resnets.0.conv1.weight"],
                           scratch["unet.down_blocks.0.resnets.0.conv1.weight"])
    preset = build_regressor(RegressorConfig(init="scratch", preset="tiny"), K, SIZE).state_dict()
    assert preset.keys() == pre.keys()
    assert all(pre[k].shape == preset[k].shape for k in pre)


def test_noise_input(export):
    model = build_regressor(cfg(export, noise_input=True, timestep=50), K, SIZE)
    x = images()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    with pytest.raises(FileNotFoundError, match="scheduler"):
        build_regressor(RegressorConfig(init="scratch", noise_input=True), K, SIZE)


@pytest.mark.parametrize("extra", [{}, {"timestep_mode": "drop", "noise_input": True,
                                         "head": "small", "freeze": "encoder"}])
def test_save_load_round_trip(export, tmp_path, extra):
    model = build_regressor(cfg(export, timestep=7, **extra), K, SIZE).eval()
    with torch.no_grad():
        last = model.head[-1] if isinstance(model.head, torch.nn.Sequential) else model.head
        last.weight.add_(0.1)                           # outputs well away from zero
    save_regressor(model, tmp_path / "model")
    save_regressor(model, tmp_path / "model")           # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = load_regressor(tmp_path / "model").eval()
    assert loaded.cfg == model.cfg and loaded.num_landmarks == K
    assert [p.requires_grad for p in loaded.parameters()] == \
        [p.requires_grad for p in model.parameters()]
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_missing_path_errors(tmp_path):
    missing = tmp_path / "nowhere" / "export"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_regressor(RegressorConfig(init="pretrained", pretrained_path=str(missing)), K, SIZE)
    with pytest.raises(ValueError, match="pretrained_path"):
        build_regressor(RegressorConfig(init="pretrained"), K, SIZE)


def test_other_size_warns_and_bad_size_errors(export):
    with pytest.warns(UserWarning, match="64 px"):
        model = build_regressor(cfg(export), K, 64)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, K, 64, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_regressor(cfg(export), K, 30)


def test_fits_gaussian_heatmap(export):
    torch.manual_seed(0)
    model = build_regressor(cfg(export), 2, SIZE)
    x = images()[:1]
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    target = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0 ** 2))
                          for cy, cx in ((10, 12), (22, 20))])[None].float()
    opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-2, 0.0))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses


def test_input_range_follows_the_pretraining_and_is_saved(export, tmp_path):
    """An export diffused in [0, 1] (diffusion.image_range=unit) gets (x + 1) / 2 as input;
    the resolved range is what the saved regressor records."""
    import shutil

    import yaml
    unit_export = tmp_path / "export"
    shutil.copytree(export[0], unit_export)
    (unit_export / "ddpm_landmarks_config.yaml").write_text(
        yaml.safe_dump({"diffusion": {"image_range": "unit"}}))
    x = images()
    signed = seeded(cfg(export))
    assert signed.cfg.input_range == "signed"            # no config saved: signed
    unit = seeded(RegressorConfig(init="pretrained", pretrained_path=str(unit_export)))
    assert unit.cfg.input_range == "unit"
    with torch.no_grad():
        assert torch.allclose(unit(x), signed((x + 1) / 2), atol=1e-6)
    save_regressor(unit, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(load_regressor(tmp_path / "saved")(x), unit(x))
