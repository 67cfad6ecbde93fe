"""The denoising U-Net: a `diffusers.UNet2DModel` (1 channel in, 1 out) built from named presets.

    model = build_unet(ModelConfig(preset="tiny"), image_size=64)
    eps = denoise(model, x_t, t)              # (B, 1, H, W) -> (B, 1, H, W), any preset

Folded presets (`fold` f > 1) run the U-Net on the image folded into f x f blocks
(pixel_unshuffle: f^2 channels at 1/f the size) and unfold its f^2 outputs back
(pixel_shuffle): every level costs 1/f^2 of the pixels while the input and the output keep
the image's full resolution. The saved UNet2DModel then has in_channels = out_channels = f^2
(the images are grayscale), which is how `unet_fold` reads f back from any saved U-Net; call
the U-Net through `denoise` (or fold_images / unfold_images), never directly.

Presets (`python -m ddpm_landmarks.models.unet` prints their parameter counts):

  tiny   64 px  tests only: 3 levels, 1 res block per level, attention at 16x16 and in the middle.
  small  128 px CPU experiments: 4 levels, attention at 16x16.
  patch   64 px the refinement stage's local network on landmark patches (data/patches.py):
                3 levels of widths 16 / 32 / 64, attention at 16x16; cheap enough to run on
                19 patches per image. patch_lite: widths 8 / 16 / 32, attention only in the
                middle block (8x8 on a 32 px patch). Cheaper local networks were tried and lost
                accuracy (experiments/bench/results_refine_cpu.md, last section).
  patch_fold 32 px the refinement's local network folded 2 x 2: widths 16 / 32 / 32 at 16 / 8 /
                4 px, attention only in the middle block. About half the cost of patch_lite per
                patch and more accurate on validation (experiments/results/label-efficiency/
                speed/).
  base   256 px the classic Ho et al. (2020) / "denoising-diffusion-pytorch" layout at 256 px:
                base width 64, multipliers (1, 1, 2, 2, 4, 4), 2 res blocks per level, attention
                at 16x16 (and in the middle block, at 8x8), dropout 0, GroupNorm 32.
  paper  256 px the network of the paper's released code (Di Via et al., WACV 2025,
                github.com/Malga-Vision/DiffusionXray-FewShot-LandmarkDetection,
                ddpm_pretraining/config/config.json + model/nn_blocks.py at commit ba85234), which
                is the lucidrains / "annotated diffusion" U-Net called as
                `Unet(dim=image_size=256, dim_mults=(1, 2, 4, 8), resnet_block_groups=4,
                att_heads=4, att_res=32, self_condition=True)`. Note that `dim` is the image size,
                so the base width is 256, and the config keys "res_blocks": 4 and "attn_res": 32
                are really the GroupNorm group count and the attention head width.

What `paper` can and cannot reproduce with UNet2DModel (read the released code, not the PDF;
the PDF does not list these numbers):
  same:    4 levels at 256/128/64/32 px with widths 256/256/512/1024, 2 res blocks per down
           level, GroupNorm with 4 groups, scale-shift (FiLM) time conditioning, sinusoidal
           time embedding [sin, cos] with exponent log(1e4)/(half-1) (flip_sin_to_cos=False,
           freq_shift=1), time-embedding width 4 x 256, full self-attention in the middle block,
           nearest-neighbour + 3x3 conv upsampling, no dropout.
  differs: * the released middle block runs at 2048 channels (the last level widens 1024 ->
             2048 without downsampling); UNet2DModel's middle block keeps the last level's width
             (1024), so this preset is much smaller: 274 M parameters here, roughly 0.5 B for
             the released model by a hand count (not verified by running the released code).
           * released: *linear* attention in every level (256x256 included); UNet2DModel only has
             full softmax attention, which is unaffordable at 256x256, so this preset puts full
             attention on the 32x32 level (and the middle block) only.
           * released attention projects to 4 heads x 32 dims (a 128-wide bottleneck); diffusers
             keeps the full width, here with 32-dim heads (channels / 32 heads).
           * up levels: 2 res blocks released, layers_per_block + 1 = 3 in UNet2DModel.
           * released: weight-standardised convs, 1x1 input conv, pixel-unshuffle + 1x1 conv
             downsampling, GELU in the time MLP, FiLM in the first conv of a res block, a final
             res block on [features, input features]; diffusers: plain convs, 3x3 input conv,
             strided 3x3 conv downsampling, SiLU, FiLM in the second conv, GroupNorm-SiLU-conv out.
           * released: self_condition=True adds an input channel that training always fills with
             zeros; a zero channel adds nothing, so it is dropped here (in_channels=1).
The released training: T=500, linear betas 1e-4..0.02, epsilon/L2, AdamW lr 1e-4, batch 4 x 8
accumulation, 30k iterations, EMA 0.995, t drawn from [1, T).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from ddpm_landmarks.config.pretrain import ModelConfig
from ddpm_landmarks.utils.modules import unwrap


def _blocks(num_levels: int, attn_levels: set[int]) -> dict[str, Any]:
    """Down/up block types with attention at the given down-level indices (0 = full resolution)."""
    down = tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D"
                 for i in range(num_levels))
    # Up block j runs at the resolution of down level (num_levels - 1 - j).
    up = tuple("AttnUpBlock2D" if (num_levels - 1 - j) in attn_levels else "UpBlock2D"
               for j in range(num_levels))
    return {"down_block_types": down, "up_block_types": up}


# UNet2DModel kwargs (minus sample_size / channels, set by build_unet) + the native "resolution".
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "resolution": 64,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        **_blocks(3, {2}),                      # 64 / 4 = 16x16
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    "small": {
        "resolution": 128,
        "block_out_channels": (32, 64, 128, 128),
        "layers_per_block": 1,
        **_blocks(4, {3}),                      # 128 / 8 = 16x16
        "norm_num_groups": 16,
        "attention_head_dim": 32,
    },
    "patch": {                                  # the refinement stage's local network
        "resolution": 64,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        **_blocks(3, {2}),                      # 64 / 4 = 16x16
        "norm_num_groups": 8,
        "attention_head_dim": 16,
    },
    "patch_lite": {                             # the same, half the width, mid attention only
        "resolution": 64,
        "block_out_channels": (8, 16, 32),
        "layers_per_block": 1,
        **_blocks(3, set()),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "patch_fold": {                             # patch_lite's blocks on 2 x 2-folded patches
        "resolution": 32,
        "fold": 2,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        **_blocks(3, set()),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "base": {
        "resolution": 256,
        "block_out_channels": (64, 64, 128, 128, 256, 256),
        "layers_per_block": 2,
        **_blocks(6, {4}),                      # 256 / 16 = 16x16
        "norm_num_groups": 32,
        "attention_head_dim": None,             # one head per layer, as in Ho et al.
        "dropout": 0.0,
        "flip_sin_to_cos": False,               # Ho et al. embedding: [sin, cos], log(1e4)/(half-1)
        "freq_shift": 1,
    },
    "paper": {
        "resolution": 256,
        "block_out_channels": (256, 256, 512, 1024),
        "layers_per_block": 2,
        **_blocks(4, {3}),                      # 256 / 8 = 32x32 (released: linear attn everywhere)
        "norm_num_groups": 4,
        "attention_head_dim": 32,
        "dropout": 0.0,
        "resnet_time_scale_shift": "scale_shift",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    },
}


def build_unet(cfg: ModelConfig, image_size: int | None = None) -> UNet2DModel:
    """UNet2DModel for `cfg.preset`; image size: cfg.sample_size, else image_size, else preset
    (the U-Net's own sample_size is that over the preset's fold)."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.preset!r}; "
                         f"valid presets: {', '.join(PRESETS)}")
    kwargs = copy.deepcopy(PRESETS[cfg.preset])
    native = kwargs.pop("resolution")
    fold = kwargs.pop("fold", 1)
    size = cfg.sample_size if cfg.sample_size is not None else (image_size or native)
    # Every level but the last halves the grid; odd sizes would break the skip concatenations.
    levels = len(kwargs["block_out_channels"])
    factor = 2 ** (levels - 1) * fold
    if not isinstance(size, int) or size <= 0 or size % factor:
        raise ValueError(f"model preset {cfg.preset!r} has {levels} levels"
                         f"{f' on {fold} x {fold}-folded images' if fold > 1 else ''}: "
                         f"the image size must be a positive multiple of {factor}, got {size!r}")
    model = UNet2DModel(sample_size=size // fold, in_channels=fold ** 2,
                        out_channels=fold ** 2, **kwargs)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def unet_fold(unet: UNet2DModel) -> int:
    """The fold f of a U-Net of grayscale images: in_channels = f^2 (1: not folded)."""
    c = unet.config
    fold = math.isqrt(int(c.in_channels))
    if fold < 1 or fold ** 2 != c.in_channels:
        raise ValueError(f"a U-Net of grayscale images has f^2 input channels (f x f-folded), "
                         f"got in_channels={c.in_channels}")
    return fold


def fold_images(x: torch.Tensor, fold: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C f^2, H / f, W / f): each f x f block becomes f^2 channels."""
    if fold == 1:
        return x
    if x.shape[-1] % fold or x.shape[-2] % fold:
        raise ValueError(f"a {fold} x {fold}-folded U-Net needs image sides divisible by {fold}, "
                         f"got {tuple(x.shape[-2:])}")
    return F.pixel_unshuffle(x, fold)


def unfold_images(y: torch.Tensor, fold: int) -> torch.Tensor:
    """The inverse of fold_images: (B, C f^2, h, w) -> (B, C, h f, w f)."""
    return y if fold == 1 else F.pixel_shuffle(y, fold)


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The U-Net's output (.sample) for images x at time steps t, folded and unfolded as the
    U-Net's fold says (a DDP- or compile-wrapped model is read through its wrapper)."""
    fold = unet_fold(unwrap(model))
    return unfold_images(model(fold_images(x, fold), t, class_labels=class_labels).sample, fold)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    """Print a Markdown table of the presets (parameters counted on the meta device: no memory)."""
    print("| preset | resolution | widths | res blocks | attention at | parameters |")
    print("|---|---|---|---|---|---|")
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = build_unet(ModelConfig(preset=name))
        res = preset["resolution"] // preset.get("fold", 1)     # the first level's grid
        attn = [f"{res // 2 ** i}px"
                for i, t in enumerate(preset["down_block_types"]) if "Attn" in t]
        if preset.get("add_attention", True):
            attn.append(f"mid {res // 2 ** (len(preset['block_out_channels']) - 1)}px")
        print(f"| {name} | {res} | {'/'.join(map(str, preset['block_out_channels']))} | "
              f"{preset['layers_per_block']} | {', '.join(attn) or 'none'} | "
              f"{count_parameters(model) / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
