"""Folded U-Nets (models/unet.py, preset patch_fold): the fold is pixel_unshuffle's block
layout and unfolds exactly; the U-Net keeps the image's size end to end in pretraining
(DDPMMethod) and fine-tuning (HeatmapRegressor); the fold is read back from any saved U-Net
(export -> pretrained regressor -> saved regressor)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.config.pretrain import ModelConfig, PretrainConfig
from ddpm_landmarks.config.schema import to_dict
from ddpm_landmarks.methods.ddpm import DDPMMethod, unet_decoder_features
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.saved_regressor import load_regressor, save_regressor
from ddpm_landmarks.models.unet import (
    build_unet,
    count_parameters,
    denoise,
    fold_images,
    unet_fold,
    unfold_images,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_fold_is_the_block_layout_and_unfolds_exactly():
    x = torch.randn(2, 3, 8, 12)
    folded = fold_images(x, 2)
    assert folded.shape == (2, 12, 4, 6)
    # Channel c * 4 + dy * 2 + dx at (i, j) is pixel (2 i + dy, 2 j + dx) of channel c.
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(folded[:, c * 4 + dy * 2 + dx], x[:, c, dy::2, dx::2])
    assert torch.equal(unfold_images(folded, 2), x)
    assert fold_images(x, 1) is x and unfold_images(x, 1) is x
    with pytest.raises(ValueError, match="divisible by 2"):
        fold_images(torch.zeros(1, 1, 6, 7), 2)


def test_patch_fold_preset_runs_at_half_size_and_costs_less_per_pixel():
    unet = build_unet(ModelConfig(preset="patch_fold"), image_size=32)
    assert unet_fold(unet) == 2
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (16, 4, 4)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 10, 500])
    with torch.no_grad():
        out = denoise(unet, x, t)
        assert torch.equal(out, unfold_images(unet(fold_images(x, 2), t).sample, 2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert unet_fold(build_unet(ModelConfig(preset="patch_lite"), image_size=32)) == 1
    # 3 levels on 2 x 2-folded images: sides must be multiples of 2 * 4.
    with pytest.raises(ValueError, match="multiple of 8"):
        build_unet(ModelConfig(preset="patch_fold"), image_size=36)
    with torch.device("meta"):
        odd = UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                          block_out_channels=(8, 8), norm_num_groups=4,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="in_channels=3"):
        unet_fold(odd)


def test_folded_regressor_keeps_the_patch_size_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_regressor(RegressorConfig(init="scratch", preset="patch_fold"), 19, 32).eval()
    assert model.fold == 2 and model.head.out_channels == 19 * 4
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 19, 32, 32)
    save_regressor(model, tmp_path / "saved")
    loaded = load_regressor(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    # A landmark's heatmap pixel depends on the image around it, at the patch's resolution: a
    # change of one input pixel changes the output first at that pixel's own 2 x 2 block.
    with torch.no_grad():
        x2 = x.clone()
        x2[:, :, 20, 9] += 1.0
        diff = (model(x2) - y).abs().sum(dim=(0, 1))
    assert diff[20 // 2 * 2:20 // 2 * 2 + 2, 9 // 2 * 2:9 // 2 * 2 + 2].max() > 0


def test_pretraining_export_to_regressor_keeps_the_fold(tmp_path):
    torch.manual_seed(0)
    cfg = PretrainConfig()
    cfg.model.preset, cfg.data.image_size = "patch_fold", 32
    cfg.diffusion.sample_steps, cfg.diffusion.num_samples = 2, 2
    method = DDPMMethod(cfg)
    batch = torch.rand(4, 1, 32, 32) * 2 - 1
    loss, logs = method.loss(method.model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(logs["loss"]) and method.model.conv_in.weight.grad.abs().sum() > 0
    assert method.sample(method.model, 2, (32, 32), steps=2).shape == (2, 1, 32, 32)
    features = unet_decoder_features(method.model, batch)
    assert features[-1].shape[-1] == 16              # the folded grid
    method.export(method.model, tmp_path / "export", to_dict(cfg))

    reg = build_regressor(RegressorConfig(init="pretrained",
                                          pretrained_path=str(tmp_path / "export")), 5, 32)
    assert reg.fold == 2
    assert torch.equal(reg.unet.conv_in.weight, method.model.conv_in.weight)
    scratch = build_regressor(RegressorConfig(init="scratch",
                                              pretrained_path=str(tmp_path / "export")), 5, 64)
    assert scratch.unet.config.sample_size == 32 and scratch(torch.zeros(1, 1, 64, 64)).shape == (
        1, 5, 64, 64)
    assert count_parameters(scratch.unet) == count_parameters(reg.unet)
