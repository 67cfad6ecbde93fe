"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020) on an smp encoder.

    method = SimCLRMethod(cfg)                      # cfg.method = "simclr", cfg.ssl
    loss, logs = method.loss(model, {"view1": x1, "view2": x2})

Two views of each image go through the encoder (global average pool of the deepest map) and a
projection MLP; NT-Xent (nt_xent_loss) makes each view pick its partner out of the 2N - 1 other
projections of the GLOBAL batch. Both views share one forward pass, so BatchNorm sees both
(as in the released TF code).

Published defaults (paper, ImageNet, ResNet-50) and ours:
- temperature: 0.1 with batch 4096 and LARS (the repository's ImageNet command); 0.5 in its
  CIFAR-10 recipe (batch 512, ResNet-18). Ours: 0.5, the small-batch value, because our
  batches are tens of images, not thousands (override with ssl.temperature).
- projection head: the paper's g(h) = W2 ReLU(W1 h) with hidden width = the encoder's output
  width (2048 for ResNet-50) and 128 outputs; BN in every layer and no bias as in the released
  code (last BN without affine, MoCo v3's simplification). Ours: hidden = the smp encoder's
  deepest channels (512 for resnet18), out 128, 2 layers (ssl.hidden_dim, proj_dim,
  proj_layers).
- negatives: all 2N - 2 other views of the global batch; projections are gathered across
  processes WITH gradient (ssl_base.gather_with_grad), so N processes x batch b compute the
  loss of one batch of N*b, with the same gradient. BatchNorm: global BN in the paper; here
  SyncBatchNorm across GPU processes (ssl.sync_bn), per-process BN on CPU processes.
- optimiser: LARS, lr 0.3 x batch / 256, weight decay 1e-6, 100+ epochs, batch 4096. The
  engine trains with AdamW (optim section); see configs/pretrain/simclr_*.yaml.
- augmentation: random resized crop (scale 0.08-1), flip, colour jitter (strength 1.0, p 0.8),
  grayscale (p 0.2), blur (p 0.5). Ours: the x-ray views of data/ssl_views.py (crop 0.3-1, no
  flip, gray jitter p 0.8, blur p 0.5, noise).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_landmarks.methods.ssl_base import (
    ContrastiveMethod,
    autocast_off,
    gather_with_grad,
    maybe_sync_bn,
    mlp,
    pooled,
    process_rank_and_count,
    top1,
)
from ddpm_landmarks.models.encoder_weights import build_smp_encoder

# ----------------------------------------------------------------------------------------------
# The loss (pure)
# ----------------------------------------------------------------------------------------------

def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                   all_z1: Optional[torch.Tensor] = None, all_z2: Optional[torch.Tensor] = None,
                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (2b, 2B), labels (2b,)) of NT-Xent for the local pairs (z1[i], z2[i]).

    Rows are the local anchors [z1; z2]; columns the global projections [all_z1; all_z2]
    (default: the local ones), cosine similarity / temperature, an anchor's own column set to
    -inf. The label of z1[i] is the column of its partner all_z2[offset + i] and vice versa;
    `offset` is the position of the local block in the global batch.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all_z1 = z1 if all_z1 is None else F.normalize(all_z1, dim=1)
    all_z2 = z2 if all_z2 is None else F.normalize(all_z2, dim=1)
    b, total = z1.shape[0], all_z1.shape[0]
    anchors = torch.cat([z1, z2])
    columns = torch.cat([all_z1, all_z2])
    logits = anchors @ columns.T / temperature
    idx = torch.arange(b, device=z1.device) + offset
    own = torch.cat([idx, idx + total])
    partner = torch.cat([idx + total, idx])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * b, device=z1.device), own] = True
    return logits.masked_fill(self_mask, float("-inf")), partner


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                 all_z1: Optional[torch.Tensor] = None, all_z2: Optional[torch.Tensor] = None,
                 offset: int = 0) -> torch.Tensor:
    """NT-Xent: the mean over the 2b local anchors a of
        -log( exp(sim(a, a+) / t) / sum_{c != a} exp(sim(a, c) / t) ),
    sim = cosine similarity, a+ the other view of the same image, c over all 2B projections
    (the global batch when all_z1 / all_z2 are given, see nt_xent_logits)."""
    logits, labels = nt_xent_logits(z1, z2, temperature, all_z1, all_z2, offset)
    return F.cross_entropy(logits, labels)


def global_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, labels) of this process's anchors against the projections of every
    process (gathered with gradient). The mean of the per-process losses is nt_xent_loss of
    the concatenated global batch, and with DDP's gradient average so is the gradient."""
    rank, _ = process_rank_and_count()
    all_z1, all_z2 = gather_with_grad(z1), gather_with_grad(z2)
    logits, labels = nt_xent_logits(z1, z2, temperature, all_z1, all_z2, rank * z1.shape[0])
    return F.cross_entropy(logits, labels), logits, labels


# ----------------------------------------------------------------------------------------------
# Model and method
# ----------------------------------------------------------------------------------------------

class SimCLRModel(nn.Module):
    """smp encoder + projection MLP; forward(x) -> projections (B, proj_dim)."""

    def __init__(self, encoder: str, in_channels: int, hidden_dim: int, proj_dim: int,
                 proj_layers: int = 2):
        super().__init__()
        self.encoder = build_smp_encoder(encoder, in_channels)
        channels = self.encoder.out_channels[-1]
        self.projector = mlp(proj_layers, channels, hidden_dim, proj_dim, batch_norm=True,
                             last_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(pooled(self.encoder, x))


class SimCLRMethod(ContrastiveMethod):
    name = "simclr"

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = SimCLRModel(c.encoder, c.in_channels, c.hidden_dim, c.proj_dim, c.proj_layers)
        return maybe_sync_bn(model, c.sync_bn, self.name)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        x1, x2 = self.views(batch, model)
        b = x1.shape[0]
        z = model(torch.cat([x1, x2]))          # one pass: BN statistics over both views
        with autocast_off(z.device):
            z = z.float()
            loss, logits, labels = global_nt_xent(z[:b], z[b:], self.cfg.temperature)
        return loss, {"loss": loss.item(), "top1": top1(logits, labels)}
