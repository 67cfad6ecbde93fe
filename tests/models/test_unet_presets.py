"""U-Net presets: they build, sizes are checked, parameter counts grow, checkpointing works."""
from __future__ import annotations

import pytest
import torch

from ddpm_landmarks.config.pretrain import ModelConfig
from ddpm_landmarks.models.unet import PRESETS, build_unet, count_parameters, main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _meta_build(preset: str, **kwargs):
    # Parameters on the meta device: shapes without memory or init time (base/paper are large).
    with torch.device("meta"):
        return build_unet(ModelConfig(preset=preset), **kwargs)


def test_every_preset_builds_at_its_resolution():
    counts = {}
    for name, preset in PRESETS.items():
        model = _meta_build(name)
        fold = preset.get("fold", 1)                 # folded presets: f^2 channels at 1/f size
        assert model.config.sample_size * fold == preset["resolution"]
        assert model.config.in_channels == model.config.out_channels == fold ** 2
        counts[name] = count_parameters(model)
        assert counts[name] > 0
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 3e5 < counts["tiny"] < 2e6


def test_tiny_and_small_forward_shapes():
    torch.manual_seed(0)
    for name, size in [("tiny", 64), ("small", 128)]:
        model = build_unet(ModelConfig(preset=name))
        x = torch.randn(1, 1, size, size)
        with torch.no_grad():
            out = model(x, torch.tensor([10])).sample
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_presets_have_attention_and_paper_settings():
    for name, preset in PRESETS.items():
        # patch_lite and patch_fold, the refinement stage's cheap local networks, have no
        # attention in their levels on purpose (only in the middle block).
        cheap = name in ("patch_lite", "patch_fold")
        assert any("Attn" in t for t in preset["down_block_types"]) == (not cheap), name
        assert len(preset["down_block_types"]) == len(preset["block_out_channels"])
    paper = _meta_build("paper").config
    assert paper.norm_num_groups == 4
    assert paper.resnet_time_scale_shift == "scale_shift"
    assert tuple(paper.block_out_channels) == (256, 256, 512, 1024)
    base = _meta_build("base").config
    assert tuple(base.block_out_channels) == (64, 64, 128, 128, 256, 256)
    assert base.down_block_types[4] == "AttnDownBlock2D"     # 256 / 2**4 = 16x16


def test_sample_size_precedence():
    assert _meta_build("tiny", image_size=32).config.sample_size == 32
    with torch.device("meta"):
        model = build_unet(ModelConfig(preset="tiny", sample_size=128), image_size=32)
    assert model.config.sample_size == 128


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny, small, patch, patch_lite, patch_fold, base, paper"):
        build_unet(ModelConfig(preset="huge"))


@pytest.mark.parametrize("preset,size", [("tiny", 50), ("base", 80), ("paper", 260)])
def test_resolution_not_divisible_is_refused(preset, size):
    with pytest.raises(ValueError, match="multiple of"):
        _meta_build(preset, image_size=size)


def test_gradient_checkpointing_flag():
    torch.manual_seed(0)
    assert not build_unet(ModelConfig(preset="tiny")).is_gradient_checkpointing
    model = build_unet(ModelConfig(preset="tiny", gradient_checkpointing=True), image_size=32)
    assert model.is_gradient_checkpointing
    model.train()
    model(torch.randn(2, 1, 32, 32), torch.tensor([3, 7])).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_main_prints_table(capsys):
    main()
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"| {name} |" in out
