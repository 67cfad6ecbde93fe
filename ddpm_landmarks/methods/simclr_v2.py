"""SimCLR v2 (Chen, Kornblith, Swersky, Norouzi, Hinton 2020, "Big self-supervised models are
strong semi-supervised learners") on an smp encoder.

    method = SimCLRv2Method(cfg)                    # cfg.method = "simclr_v2", cfg.ssl
    loss, logs = method.loss(model, {"view1": x1, "view2": x2})

SimCLR's objective (NT-Xent over the global batch: methods/simclr.py's nt_xent_loss and
global_nt_xent, the same pure functions, cross-checked against lightly's NTXentLoss in
tests/methods) with SimCLR v2's deeper projection head: ssl.proj_layers = 3 layers, hidden
width = the encoder's output width, BatchNorm in every layer (SimCLRModel with proj_layers 3).

Published defaults (paper, ResNet-50 x 1..152 x 3 with selective kernels, LARS, batch 4096) and
ours / the released code of Di Via et al. (ssl_pretraining/builders/simclrv2.py, DenseNet161,
configs/pretrain/simclr_v2_paper.yaml):
- temperature 0.1 (paper, batch 4096); ours and released 0.5 (small batches).
- head: 3 layers, hidden = encoder width, out 128 (paper and released: 2208-2208-2208-128 on
  DenseNet161; released: Linear with bias + affine BN after each layer; ours: bias-free Linear,
  BN, affine-free last BN, as methods.ssl_base.mlp).
- what is transferred: the paper fine-tunes from the head's first layer; the released code saves
  the backbone alone (its `eval()` override that would append that layer is never called), and
  so does our export (the encoder).
- the MoCo-style memory of negatives in the paper is not used (nor in the released code).
"""
from __future__ import annotations

from torch import nn

from ddpm_landmarks.methods.simclr import SimCLRMethod, SimCLRModel
from ddpm_landmarks.methods.ssl_base import maybe_sync_bn


class SimCLRv2Method(SimCLRMethod):
    """SimCLRMethod's loss and views with the v2 head (module doc)."""

    name = "simclr_v2"

    def build_model(self) -> nn.Module:
        c = self.cfg
        if c.proj_layers < 3:
            raise ValueError(f"simclr_v2: ssl.proj_layers={c.proj_layers}; SimCLR v2's head has "
                             f"3 layers (use method simclr for 2)")
        model = SimCLRModel(c.encoder, c.in_channels, c.hidden_dim, c.proj_dim, c.proj_layers)
        return maybe_sync_bn(model, c.sync_bn, self.name)
