"""DINO (Caron et al. 2021, "Emerging properties in self-supervised vision transformers") on an
smp encoder.

    method = DINOMethod(cfg)                        # cfg.method = "dino", cfg.ssl
    loss, logs = method.loss(model, {"view1": g1, "view2": g2, "local": (B, n, 1, s, s)})

A student (encoder + head) and a teacher (a momentum copy of both) see the views of an image:
the teacher the two global views, the student those and the n local crops (ssl.views:
global_size, local_crops, local_size, local_crop_scale). The student learns to predict the
teacher's output distribution for the OTHER views (dino_loss): cross-entropy between the
teacher's softmax((t - center) / teacher_temperature) and the student's
log_softmax(s / temperature), over every (teacher view, student view) pair of different views,
averaged. The center is a running mean of the teacher's outputs over the global batch
(update_center, momentum ssl.center_momentum), which keeps the teacher from collapsing onto one
dimension. The teacher follows the student by EMA once per optimiser step, its momentum rising
from ssl.momentum to ssl.momentum_end on a half cosine over train.max_steps (as MoCo v3; the
step is the buffer `model.step`, checkpointed).

Head (DINOHead): [Linear, GELU] x (proj_layers - 1) to hidden_dim, Linear to bottleneck_dim,
L2 normalisation, then a bias-free Linear to proj_dim whose weight rows are normalised at every
forward (weight_norm with its norm frozen at 1, the DINO code's `norm_last_layer`); truncated
normal (0.02) init of the MLP.

Published defaults (DINO code, ViT / ResNet-50) and the released code of Di Via et al.
(ssl_pretraining/builders/dino.py, DenseNet161), the latter in configs/pretrain/dino_paper.yaml:
- out 65536 (ResNet-50: 60000), hidden 2048, bottleneck 256; released: out 256.
- temperatures: student 0.1, teacher 0.04 (warmed up to 0.07 in long runs); released 0.1 / 0.5.
- center momentum 0.9; released 0.5.
- teacher momentum 0.996 -> 1 (cosine); released 0.996 constant, applied at every micro-batch.
- crops: 2 global at 224 px (area 0.4-1), 6 local at 96 px (0.05-0.4); released 224 / 96 px
  with areas 0.04-1 / 0.05-1 (image_size not passed, so 224 from a 256 px image).
- forward: crops of one resolution share a pass (the DINO code's MultiCropWrapper), so BatchNorm
  sees the two global views together and the local crops together (released: one pass per crop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_landmarks.methods.ssl_base import (
    ContrastiveMethod,
    autocast_off,
    cosine_momentum,
    frozen_copy,
    gather_no_grad,
    maybe_sync_bn,
    momentum_update,
    pooled,
)
from ddpm_landmarks.models.encoder_weights import build_smp_encoder
from ddpm_landmarks.utils.modules import unwrap

# ----------------------------------------------------------------------------------------------
# The loss (pure)
# ----------------------------------------------------------------------------------------------

def dino_loss(teacher_out: list[torch.Tensor], student_out: list[torch.Tensor],
              center: torch.Tensor, teacher_temperature: float,
              student_temperature: float) -> torch.Tensor:
    """Mean over the pairs (teacher view i, student view j), j != i, of
        mean over images of  -sum_d softmax((t_i - center) / T_t)_d log_softmax(s_j / T_s)_d.
    The student's first len(teacher_out) views are the teacher's views in the same order (the
    global ones); the rest (local crops) pair with every teacher view. No gradient reaches the
    teacher outputs."""
    if len(student_out) < 2 or not teacher_out:
        raise ValueError(f"dino_loss needs at least two views, got {len(teacher_out)} teacher "
                         f"and {len(student_out)} student views")
    targets = [F.softmax((t.detach() - center) / teacher_temperature, dim=-1)
               for t in teacher_out]
    logs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_out]
    terms = [-(target * log).sum(dim=-1).mean()
             for i, target in enumerate(targets) for j, log in enumerate(logs) if i != j]
    return torch.stack(terms).mean()


@torch.no_grad()
def teacher_entropy(teacher_out: list[torch.Tensor], center: torch.Tensor,
                    teacher_temperature: float) -> float:
    """Mean entropy of the teacher's targets (dino_loss minus this = the mean KL, every teacher
    view being in the same number of pairs)."""
    p = F.softmax((torch.cat(teacher_out) - center) / teacher_temperature, dim=-1)
    return (-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()).item()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: list[torch.Tensor],
                  momentum: float) -> torch.Tensor:
    """center * m + (1 - m) * the mean teacher output of this (global) batch, all views."""
    batch_center = torch.cat(teacher_out).mean(dim=0, keepdim=True)
    return center * momentum + batch_center * (1.0 - momentum)


# ----------------------------------------------------------------------------------------------
# Model and method
# ----------------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised last layer (module doc)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int,
                 num_layers: int = 3):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"the DINO head needs at least 2 layers, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers - 1):
            layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class DINOModel(nn.Module):
    """forward(global_views, local_views) -> student outputs; teacher(global_views) -> teacher
    outputs (no gradient). Buffers: `center` (1, out) and `step` (optimiser steps)."""

    def __init__(self, encoder: str, in_channels: int, hidden_dim: int, bottleneck_dim: int,
                 out_dim: int, num_layers: int):
        super().__init__()
        self.encoder = build_smp_encoder(encoder, in_channels)
        channels = self.encoder.out_channels[-1]
        self.head = DINOHead(channels, hidden_dim, bottleneck_dim, out_dim, num_layers)
        self.teacher_encoder = frozen_copy(self.encoder)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def student(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.encoder, x))

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # One pass per resolution (the DINO code's MultiCropWrapper); one DDP forward.
        local = self.student(local_views) if local_views is not None else None
        return self.student(global_views), local

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(pooled(self.teacher_encoder, x))

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        for student, teacher in ((self.encoder, self.teacher_encoder),
                                 (self.head, self.teacher_head)):
            momentum_update(student, teacher, m)


class DINOMethod(ContrastiveMethod):
    name = "dino"

    def build_model(self) -> nn.Module:
        c = self.cfg
        return maybe_sync_bn(DINOModel(c.encoder, c.in_channels, c.hidden_dim, c.bottleneck_dim,
                                       c.proj_dim, c.proj_layers), c.sync_bn, self.name)

    def momentum_at(self, step: int) -> float:
        return cosine_momentum(step, self.max_steps, self.cfg.momentum, self.cfg.momentum_end)

    def local_views(self, batch: dict, model: nn.Module) -> torch.Tensor | None:
        """(n * B, C, s, s) local crops, crop-major (crop 0 of every image first), or None."""
        local = batch.get("local")
        if local is None or local.shape[1] == 0:
            return None
        x = local.transpose(0, 1).flatten(0, 1)          # (B, n, 1, s, s) -> (n * B, 1, s, s)
        if self.cfg.in_channels != 1:
            x = x.repeat(1, self.cfg.in_channels, 1, 1)
        return x.to(next(model.parameters()).dtype)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        net = unwrap(model)
        x1, x2 = self.views(batch, model)
        if self.step_start():          # once per optimiser step (see OptimizerStepStart)
            net.update_teacher(self.momentum_at(int(net.step.item())))
            net.step += 1
        b = x1.shape[0]
        global_views = torch.cat([x1, x2])
        student_global, student_local = model(global_views, self.local_views(batch, model))
        teacher = net.teacher(global_views)
        with autocast_off(teacher.device):
            teacher_out = list(teacher.float().split(b))
            student_out = list(student_global.float().split(b))
            if student_local is not None:
                student_out += list(student_local.float().split(b))
            loss = dino_loss(teacher_out, student_out, net.center, self.cfg.teacher_temperature,
                             self.cfg.temperature)
            entropy = teacher_entropy(teacher_out, net.center, self.cfg.teacher_temperature)
            net.center.copy_(update_center(net.center, [gather_no_grad(t) for t in teacher_out],
                                           self.cfg.center_momentum))
        # The loss also holds the teacher's entropy, which the centering and sharpening move
        # on their own; what the student learns is the cross-entropy above it (the KL).
        return loss, {"loss": loss.item(), "kl": loss.item() - entropy,
                      "momentum": self.momentum_at(int(net.step.item()) - 1),
                      "views": float(len(student_out))}
