"""The released code's DDPM U-Net, module for module, so its checkpoints load strictly.

Di Via et al. (WACV 2025) released their weights for this network only:
ddpm_pretraining/model/nn_blocks.py (= downstream_task/model/models.py), a lucidrains /
"annotated diffusion" U-Net, called as

    Unet(dim=256, channels=1, dim_mults=(1, 2, 4, 8), self_condition=True,
         resnet_block_groups=4, att_heads=4, att_res=32)        # att_res is the head width

(558,548,225 parameters, 293 state-dict tensors; tests/models/data/released_unet_keys.txt
lists them with their shapes). `UNet2DModel` cannot hold it: weight-standardised convs, linear
attention at every level, a 2048-wide middle at 32 px, a 1x1 input conv over [zero
self-conditioning channel, image], a final residual block on [features, input features].
The `denoising-diffusion-pytorch` package's current Unet differs too (RMSNorm with `g`
parameters, other attention), so this is a port of the released file: same module tree, same
parameter names, same arithmetic. Adapted from that file (MIT License, Copyright (c) 2024 MaLGa
Vision), itself after Phil Wang's denoising-diffusion-pytorch (MIT).

    unet = ReleasedUnet(ReleasedUnetConfig())          # config.finetune.ReleasedUnetConfig
    eps = unet(x_t, t)                                 # x in [0, 1] in the released training
    features = unet(x)                                 # time=None: no FiLM (their fine-tuning)

`forward(x, time=None)`: the released self-conditioning channel is always zeros (training
never passed one), so it is concatenated here as zeros too. With `time=None` every residual
block skips its time scale/shift, as in the released fine-tuning. `checkpointing` (released
default: on) recomputes activations in the backward pass: memory, not arithmetic.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def upsample(dim: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(dim, dim_out, 3, padding=1))


def downsample(dim: int, dim_out: int) -> nn.Sequential:
    """Pixel-unshuffle (no strided conv or pooling) then a 1x1 conv; keys `.1.*`."""
    return nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
                         nn.Conv2d(dim * 4, dim_out, 1))


class SinusoidalPositionEmbeddings(nn.Module):
    """[sin, cos] of t x exp(-log(1e4) i / (half - 1)), i = 0 .. half - 1 (no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=time.device) * -(math.log(10000) / (half - 1)))
        angles = time[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv whose kernels are standardised (per output channel: zero mean, unit variance)
    at every forward (Qiao et al. 2019); eps 1e-5 in float32, 1e-3 otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        weight = self.weight
        mean = reduce(weight, "o ... -> o 1 1 1", "mean")
        var = reduce(weight, "o ... -> o 1 1 1", partial(torch.var, unbiased=False))
        weight = (weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks, FiLM from the time embedding in the first (`mlp`; None once dropped)."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: Optional[int], groups: int):
        super().__init__()
        self.mlp = (nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
                    if time_emb_dim is not None else None)
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None and time_emb is not None:
            emb = rearrange(self.mlp(time_emb), "b c -> b c 1 1")
            scale_shift = emb.chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift=scale_shift))
        return h + self.res_conv(x)


def split_heads(to_qkv: nn.Module, x: torch.Tensor, heads: int):
    """(q, k, v), each (B, heads, head width, H x W), from the 1x1 qkv projection of x."""
    return (rearrange(t, "b (h c) x y -> b h c (x y)", h=heads) for t in to_qkv(x).chunk(3, dim=1))


class Attention(nn.Module):
    """Softmax attention over all positions (the middle block only)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = split_heads(self.to_qkv, x, self.heads)
        sim = torch.einsum("b h d i, b h d j -> b h i j", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = torch.einsum("b h i j, b h d j -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=h, y=w))


class LinearAttention(nn.Module):
    """Linear attention (softmax over features for q, over positions for k): every level."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = split_heads(self.to_qkv, x, self.heads)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
        out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
        return self.to_out(rearrange(out, "b h c (x y) -> b (h c) x y", h=self.heads, x=h, y=w))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ReleasedUnet(nn.Module):
    """The released Unet (module doc); `cfg` is a config.finetune.ReleasedUnetConfig."""

    def __init__(self, cfg):
        super().__init__()
        dim, groups = int(cfg.dim), int(cfg.resnet_block_groups)
        heads, dim_head = int(cfg.att_heads), int(cfg.att_dim_head)
        if dim % groups or dim < 2:
            raise ValueError(f"released U-Net: dim={dim} must be a multiple of "
                             f"resnet_block_groups={groups}")
        self.cfg = cfg
        self.channels = int(cfg.channels)
        self.self_condition = bool(cfg.self_condition)
        self.checkpointing = bool(cfg.gradient_checkpointing)
        # "changed to 1 and 0 from 7,3": a 1x1 input conv over [self-condition, image].
        self.init_conv = nn.Conv2d(self.channels + int(self.self_condition), dim, 1, padding=0)
        dims = [dim, *(dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        block = partial(ResnetBlock, groups=groups)
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim),
                                      nn.GELU(), nn.Linear(time_dim, time_dim))
        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])           # registered before the middle: key order as released
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                block(d_in, d_in, time_emb_dim=time_dim),
                block(d_in, d_in, time_emb_dim=time_dim),
                Residual(PreNorm(d_in, LinearAttention(d_in, heads, dim_head))),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else downsample(d_in, d_out)]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid, time_emb_dim=time_dim)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid, heads, dim_head)))
        self.mid_block2 = block(mid, mid, time_emb_dim=time_dim)
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                block(d_out + d_in, d_out, time_emb_dim=time_dim),
                block(d_out + d_in, d_out, time_emb_dim=time_dim),
                Residual(PreNorm(d_out, LinearAttention(d_out, heads, dim_head))),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else upsample(d_out, d_in)]))
        self.final_res_block = block(dim * 2, dim, time_emb_dim=time_dim)
        self.final_conv = nn.Conv2d(dim, self.channels, 1)

    @property
    def levels_factor(self) -> int:
        """The input side must be a multiple of this (one 2x downsampling per level but the last)."""
        return 2 ** (len(self.cfg.dim_mults) - 1)

    def drop_time(self) -> None:
        """Remove the time MLP and every block's FiLM projection (parameters gone): the released
        fine-tuning calls the network without a time, so they never train there."""
        self.time_mlp = None
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                m.mlp = None

    def _run(self, fn, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, time: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.self_condition:               # never given in the released code: zeros
            x = torch.cat((torch.zeros_like(x), x), dim=1)
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time) if time is not None and self.time_mlp is not None else None
        h = []
        for block1, block2, attn, down in self.downs:
            x = self._run(block1, x, t)
            h.append(x)
            x = self._run(attn, self._run(block2, x, t))
            h.append(x)
            x = self._run(down, x)
        x = self._run(self.mid_block1, x, t)
        x = self._run(self.mid_attn, x)
        x = self._run(self.mid_block2, x, t)
        for block1, block2, attn, up in self.ups:
            x = self._run(block1, torch.cat((x, h.pop()), dim=1), t)
            x = self._run(block2, torch.cat((x, h.pop()), dim=1), t)
            x = self._run(up, self._run(attn, x))
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
