"""MoCo v2 (He et al. 2020, MoCo; Chen, Fan, Girshick, He 2020, "Improved baselines") on an
smp encoder.

    method = MoCoV2Method(cfg)                      # cfg.method = "moco_v2", cfg.ssl
    loss, logs = method.loss(model, {"view1": x_q, "view2": x_k}, generator)

The query encoder (+ MLP head) embeds view1; a momentum copy (the key encoder, updated as
k <- m k + (1 - m) q once per optimiser step, never by gradient) embeds view2. InfoNCE
(info_nce_loss) picks each query's key out of that key plus a queue of the keys of earlier
batches; after the step the GLOBAL batch of keys (gathered from every process) is enqueued,
replacing the oldest, so every process holds the same queue.

Shuffling BN (the paper's remedy for BN leaking which sample is the positive): with N > 1
processes the key images are gathered, permuted with a permutation drawn from the engine's
generator (identical on every process: no broadcast needed), each process embeds its block of
the permuted batch, and the keys are gathered and un-permuted (shuffled_keys). With one process
it is skipped: BatchNorm statistics do not depend on the order of a batch, so a shuffle within
one process changes nothing. ssl.shuffle_bn=false turns it off.

Published defaults (ImageNet, ResNet-50, batch 256) and ours:
- temperature 0.2, momentum 0.999, 128-d output, 2-layer MLP head 2048-2048-128 (fc, ReLU, fc;
  no BN): ours the same, hidden = the encoder's deepest channels (512 for resnet18).
- queue K = 65536 (256 batches of 256) of 1.28 M ImageNet images. Ours: ssl.queue_size,
  default 1024; it must be a multiple of the global batch (train.batch_size x processes), and
  queue + global batch must not exceed the image pool (check_data warns): with a pool of a few
  thousand x-rays a queue of 65536 would hold every image many times over, i.e. each query's
  own image among its negatives (in our 16-image trials the loss climbed back to chance).
- SGD lr 0.03 (batch 256), momentum 0.9, weight decay 1e-4, cosine, 200 epochs. The engine
  trains with AdamW (optim section); see configs/pretrain/moco_v2_synthetic.yaml.
- augmentation (v2 "aug+"): crop 0.2-1, colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2,
  blur sigma 0.1-2 p 0.5, flip. Ours: data/ssl_views.py (x-ray, no flip by default).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_landmarks.methods.ssl_base import (
    ContrastiveMethod,
    autocast_off,
    frozen_copy,
    gather_no_grad,
    launched_processes,
    mlp,
    momentum_update,
    pooled,
    process_rank_and_count,
    top1,
)
from ddpm_landmarks.models.encoder_weights import build_smp_encoder
from ddpm_landmarks.utils.modules import unwrap

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------

def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (b, 1 + K), labels = 0): column 0 is q_i . k_i, columns 1.. are q_i . queue_j,
    all on unit vectors (q, k and the queue rows are normalised), divided by temperature."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    queue = F.normalize(queue, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """InfoNCE: mean over i of -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t)
    + sum_j exp(q_i.queue_j / t)) ); queue (K, d) rows are the negatives."""
    logits, labels = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, labels)


class Queue(nn.Module):
    """FIFO of K key vectors (buffers, so checkpoints carry it). enqueue(keys) writes the n
    rows at ptr, ptr+1, ... (mod K), overwriting the oldest, and advances ptr by n (mod K).
    Starts with random unit vectors, as MoCo's code does."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size}")
        index = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[index] = keys.detach().to(self.keys.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)


def shuffled_keys(key_fn, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """key_fn(x) computed with the batch shuffled across processes (MoCo's shuffling BN).

    Gather every process's x, permute the global batch with a permutation drawn from
    `generator` (the same on every process), embed this process's block of the permuted batch,
    gather the results and undo the permutation; returns this process's rows. For a per-sample
    key_fn (no BN in train mode) the result equals key_fn(x). One process: key_fn(x).
    """
    rank, size = process_rank_and_count()
    if size == 1:
        return key_fn(x)
    b = x.shape[0]
    x_all = gather_no_grad(x)
    gen_device = generator.device if generator is not None else x.device
    perm = torch.randperm(b * size, generator=generator, device=gen_device).to(x.device)
    mine = perm[rank * b:(rank + 1) * b]
    k_shuffled = gather_no_grad(key_fn(x_all[mine]))       # row j = key of x_all[perm[j]]
    k_all = torch.empty_like(k_shuffled)
    k_all[perm] = k_shuffled                               # row i = key of x_all[i]
    return k_all[rank * b:(rank + 1) * b]


# ----------------------------------------------------------------------------------------------
# Model and method
# ----------------------------------------------------------------------------------------------

class MoCoV2Model(nn.Module):
    """Query encoder + MLP head (trained), key encoder + head (momentum copies), key queue.
    forward(x) -> queries (B, proj_dim); keys(x) -> keys, no gradient."""

    def __init__(self, encoder: str, in_channels: int, hidden_dim: int, proj_dim: int,
                 queue_size: int, proj_layers: int = 2):
        super().__init__()
        self.encoder = build_smp_encoder(encoder, in_channels)
        channels = self.encoder.out_channels[-1]
        self.projector = mlp(proj_layers, channels, hidden_dim, proj_dim, batch_norm=False)
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projector = frozen_copy(self.projector)
        self.queue = Queue(queue_size, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(pooled(self.encoder, x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(pooled(self.key_encoder, x))

    @torch.no_grad()
    def update_keys(self, m: float) -> None:
        momentum_update(self.encoder, self.key_encoder, m)
        momentum_update(self.projector, self.key_projector, m)


class MoCoV2Method(ContrastiveMethod):
    name = "moco_v2"

    def build_model(self) -> nn.Module:
        c = self.cfg
        global_batch = self.batch_size * launched_processes()
        if c.queue_size % global_batch:
            raise ValueError(f"ssl.queue_size={c.queue_size} must be a multiple of the global "
                             f"batch train.batch_size x processes = {global_batch}")
        return MoCoV2Model(c.encoder, c.in_channels, c.hidden_dim, c.proj_dim, c.queue_size,
                           c.proj_layers)

    def check_data(self, num_images: int) -> None:
        batch = self.batch_size * launched_processes()
        if self.cfg.queue_size + batch > num_images:
            fit = max(batch, (num_images - batch) // batch * batch)
            log.warning("moco_v2: ssl.queue_size=%d + global batch %d > %d images: the queue "
                        "holds keys of the current images themselves (false negatives); use "
                        "ssl.queue_size <= %d", self.cfg.queue_size, batch, num_images, fit)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        net = unwrap(model)
        x_q, x_k = self.views(batch, model)
        if self.step_start():
            net.update_keys(self.cfg.momentum)
        with torch.no_grad():
            if self.cfg.shuffle_bn:
                k = shuffled_keys(net.keys, x_k, generator)
            else:
                k = net.keys(x_k)
        q = model(x_q)
        with autocast_off(q.device):
            # The queue is cloned: enqueue below writes it in place before the backward pass.
            logits, labels = info_nce_logits(q.float(), k.float(), net.queue.keys.clone(),
                                             self.cfg.temperature)
            loss = F.cross_entropy(logits, labels)
        net.queue.enqueue(F.normalize(gather_no_grad(k.float()), dim=1))
        return loss, {"loss": loss.item(), "top1": top1(logits, labels)}
