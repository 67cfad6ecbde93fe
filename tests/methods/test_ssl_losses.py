"""SSL baselines, the pure pieces by hand: NT-Xent, InfoNCE, the MoCo v3 loss, the MoCo queue,
the momentum update and MoCo v3's momentum schedule.

Expected values are written out from the definitions with `math` on 2-d vectors whose cosine
similarities are read off directly (a=(1,0), b=(0,1): a.b = 0; c=(0.6,0.8): a.c = 0.6, ...).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm_landmarks.methods.moco_v2 import Queue, info_nce_loss
from ddpm_landmarks.methods.moco_v3 import moco_v3_loss
from ddpm_landmarks.methods.simclr import nt_xent_loss
from ddpm_landmarks.methods.ssl_base import cosine_momentum, momentum_update

A, B = (1.0, 0.0), (0.0, 1.0)
C, D = (0.6, 0.8), (-0.8, 0.6)         # C.A = 0.6, C.B = 0.8, D.A = -0.8, D.B = 0.6, C.D = 0


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def nll(pos: float, others: list[float], temperature: float) -> float:
    """-log( e^(pos/t) / (e^(pos/t) + sum e^(o/t)) ) for similarities pos and others."""
    num = math.exp(pos / temperature)
    return -math.log(num / (num + sum(math.exp(o / temperature) for o in others)))


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_by_hand(temperature):
    # pairs (A, C) and (B, D); each anchor's denominator runs over the 3 other vectors.
    z1, z2 = t(A, B), t(C, D)
    expected = (nll(0.6, [0.0, -0.8], temperature)      # anchor A: pos C; others B, D
                + nll(0.6, [0.0, 0.8], temperature)     # anchor B: pos D; others A, C
                + nll(0.6, [0.8, 0.0], temperature)     # anchor C: pos A; others B, D
                + nll(0.6, [-0.8, 0.0], temperature)) / 4  # anchor D: pos B; others A, C
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-12)
    # Cosine similarity: the length of an embedding does not matter.
    assert nt_xent_loss(3 * z1, 0.5 * z2, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_of_two_halves_averages_to_the_global_batch():
    """What each of 2 processes computes (its anchors vs all projections, offset to its
    block) averages to the loss of the whole batch."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), \
        torch.randn(6, 4, generator=g, dtype=torch.float64)
    whole = nt_xent_loss(z1, z2, 0.3)
    halves = [nt_xent_loss(z1[r * 3:(r + 1) * 3], z2[r * 3:(r + 1) * 3], 0.3, z1, z2, r * 3)
              for r in range(2)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_info_nce_by_hand(temperature):
    q, k = t(A, B), t(C, D)
    queue = t(B, (-1.0, 0.0))                           # negatives: (0, 1) and (-1, 0)
    expected = (nll(0.6, [0.0, -1.0], temperature)      # q A: pos A.C; A.B = 0, A.(-A) = -1
                + nll(0.6, [1.0, 0.0], temperature)) / 2  # q B: pos B.D; B.B = 1, B.(-A) = 0
    assert info_nce_loss(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-12)
    # Queue rows are normalised as well.
    assert info_nce_loss(q, k, 2 * queue, temperature).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_moco_v3_loss_by_hand(temperature):
    q, k = t(A, B), t(C, (0.8, 0.6))                     # q A: A.k = [0.6, 0.8]; q B: [0.8, 0.6]
    ce = (nll(0.6, [0.8], temperature) + nll(0.6, [0.8], temperature)) / 2
    assert moco_v3_loss(q, k, temperature).item() == pytest.approx(2 * temperature * ce, rel=1e-12)
    # Process 1 of 2 holds query B; its key is k[1] of the gathered keys.
    part = moco_v3_loss(q[1:], k, temperature, offset=1)
    assert part.item() == pytest.approx(2 * temperature * nll(0.6, [0.8], temperature), rel=1e-12)


def test_queue_enqueue_dequeue_wraps_and_replaces_the_oldest():
    queue = Queue(size=4, dim=2)
    initial = queue.keys.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(4))     # random unit vectors
    queue.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert queue.ptr.item() == 3
    assert queue.keys[:3, 0].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(queue.keys[3], initial[3])
    queue.enqueue(torch.tensor([[4.0, 0], [5, 0]]))              # rows 3, then 0 (wrap)
    assert queue.ptr.item() == 1
    assert queue.keys[:, 0].tolist() == [5.0, 2.0, 3.0, 4.0]       # 1, the oldest, replaced
    queue.enqueue(torch.tensor([[6.0, 0], [7, 0], [8, 0], [9, 0]]))  # a full turn
    assert queue.ptr.item() == 1
    assert queue.keys[:, 0].tolist() == [9.0, 6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="cannot enqueue 5"):
        queue.enqueue(torch.zeros(5, 2))
    assert set(dict(queue.named_buffers())) == {"keys", "ptr"}    # in every checkpoint


def test_momentum_update_exact():
    online, target = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)), \
        nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(3.0)
        for p in target.parameters():
            p.fill_(1.0)
        target[1].running_mean.fill_(7.0)
    momentum_update(online, target, 0.9)
    for p in target.parameters():                                # 0.9 * 1 + 0.1 * 3
        assert torch.allclose(p, torch.full_like(p, 1.2), atol=1e-7)
    for p in online.parameters():
        assert torch.equal(p, torch.full_like(p, 3.0))           # online untouched
    assert target[1].running_mean.item() == 7.0                 # buffers are not averaged
    momentum_update(online, target, 0.5)                         # 0.5 * 1.2 + 0.5 * 3
    assert target[0].weight[0, 0].item() == pytest.approx(2.1, abs=1e-6)


def test_moco_v3_momentum_schedule():
    assert cosine_momentum(0, 1000, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(1000, 1000, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(1200, 1000, 0.99) == pytest.approx(1.0)      # clamped after the end
    assert cosine_momentum(500, 1000, 0.99, end=0.999) == pytest.approx((0.99 + 0.999) / 2)
