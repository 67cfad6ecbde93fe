"""Pieces shared by the contrastive SSL baselines (simclr.py, moco_v2.py, moco_v3.py).

- the encoder: an smp encoder by name (models.encoder_weights.build_smp_encoder), whose
  state_dict is exactly `smp.Unet(name, in_channels=C, encoder_weights=None).encoder`'s; the
  representation is the global average pool of its deepest feature map;
- MLP heads (`mlp`), the momentum update (`momentum_update`), the MoCo v3 momentum schedule;
- cross-process gathers: `gather_with_grad` (SimCLR's negatives: gradients flow back to the
  process that computed them) and `gather_no_grad` (MoCo keys);
- `ContrastiveMethod`: the engine's Method interface for all three (views in, image grid of the
  views, export of the encoder for fine-tuning).

Export contract (models/artifacts.py kind "ssl_encoder"; what fine-tuning loads, with
models.encoder_weights.load_ssl_encoder), written atomically into run_dir/export/:
    encoder.safetensors   the ONLINE (query) encoder's state_dict, keys as smp.Unet(...).encoder
    encoder.json          {"format": "ddpm_landmarks.ssl_encoder", "version": 1,
                           "encoder": name, "in_channels": C, "method": "simclr" | ...,
                           "input_norm": "none"}
    config.yaml           the resolved run config
The encoder saw gray images in [-1, 1] (data.ssl_views) without further normalisation
("input_norm": "none"), repeated to 3 channels when C = 3.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from ddpm_landmarks.methods.base import Method
from ddpm_landmarks.models.artifacts import FORMATS, write_meta
from ddpm_landmarks.models.encoder_weights import smp_encoder_channels
from ddpm_landmarks.utils.atomic import atomic_directory
from ddpm_landmarks.utils.modules import unwrap

log = logging.getLogger(__name__)

EXPORT = FORMATS["ssl_encoder"]
# The encoder saw the project's [-1, 1] gray images unchanged (models.smp_regressor's "none").
INPUT_NORM = "none"


# ----------------------------------------------------------------------------------------------
# Encoder and heads
# ----------------------------------------------------------------------------------------------

def pooled(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Representation: global average pool of the encoder's deepest feature map, (B, C)."""
    return encoder(x)[-1].mean(dim=(2, 3))


@torch.no_grad()
def encoder_stage_features(encoder: nn.Module, images: torch.Tensor,
                           in_channels: int) -> list[torch.Tensor]:
    """An smp encoder's five stages (strides 2 to 32) for gray (B, 1, H, W) images, repeated
    to `in_channels` as in pretraining: the hypercolumn of the landmark probe and of the
    transferability estimate (studies/transferability.py)."""
    x = images.to(next(encoder.parameters()).dtype)
    if x.shape[1] == 1 and in_channels != 1:
        x = x.repeat(1, in_channels, 1, 1)
    return list(encoder(x)[1:])        # [0] is the input itself


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, batch_norm: bool,
        last_bn: bool = False) -> nn.Sequential:
    """MLP head. batch_norm=True: [Linear (no bias), BN, ReLU] x (num_layers - 1), then Linear
    (no bias) and, with last_bn, BN without affine (SimCLR's / MoCo v3's heads).
    batch_norm=False: [Linear, ReLU] x (num_layers - 1), then Linear (MoCo v2's head)."""
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
        if i < num_layers - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif batch_norm and last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy with the same weights that the optimiser never sees (requires_grad False)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, parameter by parameter (buffers untouched:
    the momentum encoder keeps its own BN statistics, as in MoCo's code)."""
    for p_online, p_target in zip(online.parameters(), target.parameters()):
        p_target.mul_(m).add_(p_online.detach(), alpha=1.0 - m)


def cosine_momentum(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """MoCo v3 (and BYOL) schedule: `start` at step 0, rising on a half cosine to `end` at
    total_steps: m = end - (end - start) * (cos(pi * t / T) + 1) / 2."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def process_rank_and_count() -> tuple[int, int]:
    """(process index, number of processes) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradients over processes and returns this
    process's block: d(sum_r L_r)/dx_local. With DDP's gradient average (1/N) this is the
    gradient of the mean of the per-process losses, i.e. of one loss over the global batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = process_rank_and_count()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N * b, ...) = every process's x in process order; gradients reach each process's own
    block (see _GatherWithGrad). One process: x itself. Every process must call it with the
    same shape."""
    if process_rank_and_count()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(N * b, ...) = every process's x in process order, detached. One process: x."""
    rank, size = process_rank_and_count()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def will_run_on_gpu() -> bool:
    """Whether accelerate will put this process on a GPU (before the Accelerator exists)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not use_cpu


def launched_processes() -> int:
    """Number of processes of this launch (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def maybe_sync_bn(model: nn.Module, enabled: bool, method: str) -> nn.Module:
    """SyncBatchNorm across processes when enabled, launched on >1 process, on GPUs.

    BN statistics over the global batch are what SimCLR ("global BN") and MoCo v3 (SyncBN)
    train with. SyncBatchNorm needs GPUs; on CPU processes BN stays per process (a warning).
    One process: plain BN is already global."""
    if not enabled or launched_processes() == 1:
        return model
    if not will_run_on_gpu():
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("%s: ssl.sync_bn needs GPUs; on CPU processes BatchNorm statistics "
                        "are per process (over train.batch_size images)", method)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class OptimizerStepStart:
    """Call once per micro-batch: True on the first micro-batch of each optimiser step.

    Momentum encoders follow the online weights, which change only on optimiser steps; with
    gradient accumulation the update (and MoCo v3's step count) happens once per optimiser
    step. Reads accelerate's GradientState (set by the engine's accumulate context); outside
    an engine every call starts a step. A fresh object starts a step, which is right after a
    resume (checkpoints are taken between optimiser steps)."""

    def __init__(self) -> None:
        self._next_starts = True

    def __call__(self) -> bool:
        from accelerate.state import GradientState
        starts = self._next_starts
        self._next_starts = bool(GradientState().sync_gradients)
        return starts


def autocast_off(device: torch.device):
    """Context without autocast: contrastive logits in float32 under bf16 / fp16 training
    (nothing to switch off on the meta device, where --dry-run counts FLOPs)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the positive (a readable training signal)."""
    return (logits.detach().argmax(dim=1) == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------
# The method base
# ----------------------------------------------------------------------------------------------

class ContrastiveMethod(Method):
    """Engine Method (methods.base) for the two-view contrastive baselines.

    Subclasses set `name`, build `self.model` in `build_model()` (an nn.Module whose `encoder`
    attribute is the smp encoder to export) and implement `loss`.
    """

    name = ""

    def __init__(self, cfg: Any):
        """cfg: a PretrainConfig (its ssl, train and data sections)."""
        from ddpm_landmarks.config.pretrain import resolve_ssl_config
        channels = smp_encoder_channels(cfg.ssl.encoder, cfg.ssl.in_channels)
        self.cfg = resolve_ssl_config(self.name, cfg.ssl, channels)
        self.encoder_channels = channels
        self.image_size = cfg.data.image_size
        self.batch_size = cfg.train.batch_size
        self.max_steps = cfg.train.max_steps
        self.num_processes = launched_processes()
        self.step_start = OptimizerStepStart()
        self.model = self.build_model()

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def check_data(self, num_images: int) -> None:
        """Called by pretrain with the number of images of an epoch (warnings only)."""

    # -- inputs ------------------------------------------------------------------------------

    def views(self, batch: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(view1, view2) as encoder input: gray repeated to in_channels, the model's dtype."""
        dtype = next(model.parameters()).dtype
        out = []
        for key in ("view1", "view2"):
            x = batch[key]
            if x.shape[1] == 1 and self.cfg.in_channels != 1:
                x = x.repeat(1, self.cfg.in_channels, 1, 1)
            out.append(x.to(dtype))
        return out[0], out[1]

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- images ------------------------------------------------------------------------------

    @torch.no_grad()
    def log_images(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """{"views": first row view1, second row view2} of up to 8 images, in [0, 1]."""
        from torchvision.utils import make_grid
        n = min(8, batch["view1"].shape[0])
        one = (batch["view1"][:n].float().cpu().clamp(-1, 1) + 1) / 2
        two = (batch["view2"][:n].float().cpu().clamp(-1, 1) + 1) / 2
        return {"views": make_grid(torch.cat([one, two]), nrow=n, padding=2, pad_value=1.0)}

    # -- landmark probe (training/probe.py) ------------------------------------------------

    @torch.no_grad()
    def probe_features(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """The exported (online) encoder's five stages, see encoder_stage_features."""
        return encoder_stage_features(unwrap(model).encoder, images, self.cfg.in_channels)

    # -- export ------------------------------------------------------------------------------

    def export(self, model: nn.Module, out_dir: Path, config_dict: dict) -> None:
        """out_dir/{encoder.safetensors, encoder.json, config.yaml}, atomically (see module)."""
        from safetensors.torch import save_file
        encoder = unwrap(model).encoder
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        meta = {"encoder": self.cfg.encoder, "in_channels": self.cfg.in_channels,
                "method": self.name, "input_norm": INPUT_NORM}
        with atomic_directory(out_dir) as tmp:
            save_file(state, str(tmp / EXPORT.weights_file), metadata={"format": "pt"})
            write_meta(tmp, "ssl_encoder", meta)
            (tmp / EXPORT.config_file).write_text(yaml.safe_dump(config_dict, sort_keys=False))
