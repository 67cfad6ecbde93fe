"""MoCo v3 (Chen, Xie, He 2021, "An empirical study of training self-supervised vision
transformers") on an smp encoder.

    method = MoCoV3Method(cfg)                      # cfg.method = "moco_v3", cfg.ssl
    loss, logs = method.loss(model, {"view1": x1, "view2": x2})

No queue: the keys are the momentum encoder's embeddings of the other view of the GLOBAL batch
(gathered from every process, without gradient). Queries go through encoder, projector and
predictor; keys through the momentum encoder and projector. The loss is symmetric:
    moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1),  each 2 t x CE(q . k / t, own key).
The momentum rises from ssl.momentum to ssl.momentum_end on a half cosine over
train.max_steps (cosine_momentum). The step it is read at is the buffer `model.step` (one count
per optimiser step), so it is saved in every checkpoint and a resumed run continues the
schedule where it stopped.

Published defaults (released code, ResNet-50 recipe; ViT recipe in brackets) and ours:
- temperature 1.0 (ViT: 0.2; the code's default --moco-t is 1.0 and its ResNet-50 commands
  keep it). Ours: 1.0, since our encoders are CNNs.
- momentum 0.99 -> 1 with the cosine (0.996 for the 1000-epoch ResNet run): ours 0.99 -> 1.
- heads: projector 2 Linear layers for ResNet (3 for ViT), predictor 2, hidden 4096, output
  256, BN after every hidden Linear, no biases, a last BN without affine on the projector only.
  Ours: hidden = 2 x the encoder's deepest channels (4096 = 2 x 2048 for ResNet-50; 1024 for
  resnet18), output 256, 2 projector layers (ssl.hidden_dim, proj_dim, proj_layers).
- BatchNorm: SyncBN across GPUs (the code converts the whole model); here ssl.sync_bn, per
  process on CPU processes.
- LARS lr 0.6 x batch / 256 (0.45 in early versions), weight decay 1e-6, batch 4096, crop
  scale 0.08-1 (0.2 in the reference commands), BYOL's asymmetric blur / solarisation. The
  engine trains with AdamW (MoCo v3's ViT optimiser); our views are the symmetric x-ray views
  of data/ssl_views.py (no solarisation).
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
    mlp,
    momentum_update,
    pooled,
    process_rank_and_count,
    top1,
)
from ddpm_landmarks.models.encoder_weights import build_smp_encoder
from ddpm_landmarks.utils.modules import unwrap

# ----------------------------------------------------------------------------------------------
# The loss (pure)
# ----------------------------------------------------------------------------------------------

def moco_v3_logits(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (b, B), labels): cosine similarities of the b local queries with all B keys
    over temperature; query i's own key is k[offset + i] (offset = this process's block)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    return logits, torch.arange(q.shape[0], device=q.device) + offset


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float,
                 offset: int = 0) -> torch.Tensor:
    """2 t x mean over i of -log( exp(q_i.k_{offset+i} / t) / sum_j exp(q_i.k_j / t) ),
    on unit vectors; k holds the keys of the global batch (the local ones on one process)."""
    logits, labels = moco_v3_logits(q, k, temperature, offset)
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


# ----------------------------------------------------------------------------------------------
# Model and method
# ----------------------------------------------------------------------------------------------

class MoCoV3Model(nn.Module):
    """forward(x1, x2) -> (q1, q2) predictions; keys(x) -> momentum embeddings (no gradient).
    `step` (a buffer, checkpointed) counts the optimiser steps for the momentum schedule."""

    def __init__(self, encoder: str, in_channels: int, hidden_dim: int, proj_dim: int,
                 proj_layers: int = 2):
        super().__init__()
        self.encoder = build_smp_encoder(encoder, in_channels)
        channels = self.encoder.out_channels[-1]
        self.projector = mlp(proj_layers, channels, hidden_dim, proj_dim, batch_norm=True,
                             last_bn=True)
        self.predictor = mlp(2, proj_dim, hidden_dim, proj_dim, batch_norm=True, last_bn=False)
        self.momentum_encoder = frozen_copy(self.encoder)
        self.momentum_projector = frozen_copy(self.projector)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(pooled(self.encoder, x)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Two passes, as the released code: BN statistics per view.
        return self.query(x1), self.query(x2)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.momentum_projector(pooled(self.momentum_encoder, x))

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        momentum_update(self.encoder, self.momentum_encoder, m)
        momentum_update(self.projector, self.momentum_projector, m)


class MoCoV3Method(ContrastiveMethod):
    name = "moco_v3"

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = MoCoV3Model(c.encoder, c.in_channels, c.hidden_dim, c.proj_dim, c.proj_layers)
        return maybe_sync_bn(model, c.sync_bn, self.name)

    def momentum_at(self, step: int) -> float:
        return cosine_momentum(step, self.max_steps, self.cfg.momentum, self.cfg.momentum_end)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        net = unwrap(model)
        x1, x2 = self.views(batch, model)
        if self.step_start():          # once per optimiser step (see OptimizerStepStart)
            net.update_momentum(self.momentum_at(int(net.step.item())))
            net.step += 1
        m = self.momentum_at(int(net.step.item()) - 1)      # this optimiser step's momentum
        q1, q2 = model(x1, x2)
        k1, k2 = net.keys(x1), net.keys(x2)
        rank, _ = process_rank_and_count()
        offset = rank * x1.shape[0]
        with autocast_off(q1.device):
            k1_all, k2_all = gather_no_grad(k1.float()), gather_no_grad(k2.float())
            logits1, labels = moco_v3_logits(q1.float(), k2_all, self.cfg.temperature, offset)
            logits2, _ = moco_v3_logits(q2.float(), k1_all, self.cfg.temperature, offset)
            scale = 2.0 * self.cfg.temperature
            loss = (F.cross_entropy(logits1, labels) + F.cross_entropy(logits2, labels)) * scale
        return loss, {"loss": loss.item(), "momentum": m,
                      "top1": (top1(logits1, labels) + top1(logits2, labels)) / 2}
