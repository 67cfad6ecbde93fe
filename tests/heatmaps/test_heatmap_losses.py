"""Heatmap losses: hand-computed values, masking, registry, monotonicity, dtypes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_landmarks.config.common import HeatmapConfig
from ddpm_landmarks.heatmaps.losses import (
    LOSSES,
    bce_heatmap_loss,
    heatmap_loss,
    mse_heatmap_loss,
    spatial_softmax_ce_loss,
)
from ddpm_landmarks.heatmaps.targets import make_targets

LN2, LN3 = math.log(2.0), math.log(3.0)
ALL = torch.tensor([[True, True]])


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---- tiny fixed inputs: B=1, K=2, H=W=2 -------------------------------------------------------
# MSE: ch0 target [[1,0],[0,0]], pred [[.5,0],[0,1]] -> sq [[.25,0],[0,1]]
#      ch1 target zeros,        pred [[0,0],[0,.5]]  -> sq [[0,0],[0,.25]]
MSE_PRED = t([[[[0.5, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.5]]]])
MSE_TGT = t([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])


def test_mse_hand_value_unweighted():
    # ch0: (0.25 + 1) / 4 = 0.3125 ; ch1: 0.25 / 4 = 0.0625 ; mean = 0.1875
    assert mse_heatmap_loss(MSE_PRED, MSE_TGT, ALL).item() == pytest.approx(0.1875)


def test_mse_foreground_weighting_hand_value():
    # fg weight 3: ch0 weights [[3,1],[1,1]] (sum 6): (3*0.25 + 1) / 6 = 1.75/6 = 0.291667
    # ch1 has no foreground: still 0.0625. mean = (1.75/6 + 0.0625) / 2 = 0.177083
    loss = mse_heatmap_loss(MSE_PRED, MSE_TGT, ALL, foreground_weight=3.0)
    assert loss.item() == pytest.approx((1.75 / 6 + 0.0625) / 2)
    # threshold above the peak: nothing is foreground -> plain MSE
    loss = mse_heatmap_loss(MSE_PRED, MSE_TGT, ALL, foreground_weight=3.0, foreground_threshold=1.0)
    assert loss.item() == pytest.approx(0.1875)
    with pytest.raises(ValueError):
        mse_heatmap_loss(MSE_PRED, MSE_TGT, ALL, foreground_weight=0.0)


# BCE: ch0 logits [[0, ln3],[ln3, 0]], target [[1,1],[0,0]]
#   logit 0 -> ln2 (either target); logit ln3 (p=3/4): target 1 -> ln(4/3), target 0 -> ln 4
#   ch0 = (ln2 + ln(4/3) + ln4 + ln2) / 4 ; ch1: logits 0 -> ln2
BCE_PRED = t([[[[0.0, LN3], [LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
BCE_TGT = t([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]]])


def test_bce_hand_value():
    ch0 = (LN2 + math.log(4 / 3) + math.log(4) + LN2) / 4
    assert bce_heatmap_loss(BCE_PRED, BCE_TGT, ALL).item() == pytest.approx((ch0 + LN2) / 2)


def test_bce_pos_weight_hand_value():
    # pos_weight 2 doubles the positive terms: ch0 = (2 ln2 + 2 ln(4/3) + ln4 + ln2) / 4
    # ch1: one positive pixel (2 ln2) + three negatives (ln2) -> 5 ln2 / 4
    ch0 = (2 * LN2 + 2 * math.log(4 / 3) + math.log(4) + LN2) / 4
    ch1 = 5 * LN2 / 4
    assert bce_heatmap_loss(BCE_PRED, BCE_TGT, ALL, pos_weight=2.0).item() == pytest.approx((ch0 + ch1) / 2)
    # per-landmark (K,) weights: only ch1 weighted
    pw = torch.tensor([1.0, 2.0])
    ch0_plain = (LN2 + math.log(4 / 3) + math.log(4) + LN2) / 4
    assert bce_heatmap_loss(BCE_PRED, BCE_TGT, ALL, pos_weight=pw).item() == pytest.approx((ch0_plain + ch1) / 2)
    with pytest.raises(ValueError):
        bce_heatmap_loss(BCE_PRED, BCE_TGT, ALL, pos_weight=torch.ones(3))


# Softmax CE: logits [[0, ln3],[0,0]] -> softmax [[1,3],[1,1]] / 6
CE_PRED = t([[[[0.0, LN3], [0.0, 0.0]], [[0.0, LN3], [0.0, 0.0]]]])


def test_softmax_ce_hand_value():
    # ch0 single pixel (0,1): -log(3/6) = ln2
    # ch1 pixels (0,0),(0,1) > 0.5 (the 0.4 pixel is below threshold): q = 1/2 each
    #     -(0.5 log(1/6) + 0.5 log(3/6)) = 0.5 ln6 + 0.5 ln2
    tgt = t([[[[0.0, 1.0], [0.0, 0.0]], [[0.9, 0.6], [0.4, 0.0]]]])
    ch1 = 0.5 * math.log(6) + 0.5 * LN2
    assert spatial_softmax_ce_loss(CE_PRED, tgt, ALL).item() == pytest.approx((LN2 + ch1) / 2)


def test_softmax_ce_equals_cross_entropy_single_pixel():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 5, 6, generator=g)
    idx = torch.randint(0, 30, (3, 4), generator=g)
    tgt = F.one_hot(idx, 30).float().reshape(3, 4, 5, 6)
    mask = torch.ones(3, 4, dtype=torch.bool)
    ref = F.cross_entropy(pred.reshape(12, 30), idx.reshape(12))
    assert spatial_softmax_ce_loss(pred, tgt, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_softmax_ce_empty_present_channel_masked_or_error():
    # Reachable from make_targets: a point 3.5 px left of the grid with sigma 3 is within the
    # 3-sigma margin (mask True) but its on-grid peak is exp(-16/18) ~ 0.41 < 0.5.
    maps, m = make_targets(np.array([[-4.0, 5.0], [8.0, 8.0]]), (16, 16), HeatmapConfig(sigma=3.0))
    assert m.all() and maps[0].max() < 0.5
    tgt, mask = torch.from_numpy(maps)[None], torch.from_numpy(m)[None]
    pred = torch.randn(1, 2, 16, 16)
    only_ch1 = spatial_softmax_ce_loss(pred, tgt, torch.tensor([[False, True]]))
    assert spatial_softmax_ce_loss(pred, tgt, mask).item() == pytest.approx(only_ch1.item())
    with pytest.raises(ValueError, match=r"\(0, 0\)"):
        spatial_softmax_ce_loss(pred, tgt, mask, on_empty="error")
    with pytest.raises(ValueError):
        spatial_softmax_ce_loss(pred, tgt, mask, on_empty="bogus")


# ---- masking ------------------------------------------------------------------------------------
def _random_case(seed=0, b=2, k=3, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, k, h, w, generator=g)
    tgt = torch.zeros(b, k, h, w)
    ys = torch.randint(1, h - 1, (b, k), generator=g)
    xs = torch.randint(1, w - 1, (b, k), generator=g)
    for i in range(b):
        for j in range(k):
            tgt[i, j, ys[i, j], xs[i, j]] = 1.0
            tgt[i, j, ys[i, j] - 1, xs[i, j]] = 0.6
            tgt[i, j, ys[i, j], xs[i, j] + 1] = 0.3
    return pred, tgt


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_channel_has_no_effect_and_zero_grad(name):
    pred, tgt = _random_case()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    mask[1, 2] = False
    base = heatmap_loss(name, pred, tgt, mask)
    pred2 = pred.clone()
    pred2[0, 1] = 100.0 * torch.randn(6, 7)
    pred2[1, 2] = float("inf")                     # even non-finite values do not leak
    pred2.requires_grad_(True)
    loss = heatmap_loss(name, pred2, tgt, mask)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    # the mean is over present channels only: equal to the mean of the per-channel losses
    # (channel_ce couples the channels through its softmax: no per-channel split)
    per = [heatmap_loss(name, pred[i:i + 1, j:j + 1], tgt[i:i + 1, j:j + 1], None).item()
           for i in range(2) for j in range(3) if mask[i, j]]
    if name != "channel_ce":
        assert base.item() == pytest.approx(sum(per) / len(per), rel=1e-6)
    pred3 = pred.clone()
    pred3[0, 1] = 5.0
    pred3.requires_grad_(True)
    heatmap_loss(name, pred3, tgt, mask).backward()
    assert torch.all(pred3.grad[0, 1] == 0) and torch.all(pred3.grad[1, 2] == 0)
    assert pred3.grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_masked_is_zero_with_finite_grad(name):
    pred, tgt = _random_case()
    pred.requires_grad_(True)
    loss = heatmap_loss(name, pred, tgt, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad == 0)


# ---- behaviour ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_toward_target(name):
    pred0, tgt = _random_case(seed=1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    if name == "mse":
        best = tgt
    elif name == "bce":
        best = torch.logit(tgt.clamp(1e-4, 1 - 1e-4))
    else:
        best = 20.0 * (tgt > 0.5).float()
    losses = [heatmap_loss(name, (1 - a) * pred0 + a * best, tgt, mask).item()
              for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bfloat16_inputs_return_float32(name):
    pred, tgt = _random_case(seed=2)
    mask = torch.ones(2, 3, dtype=torch.bool)
    ref = heatmap_loss(name, pred, tgt, mask)
    pb = pred.to(torch.bfloat16).requires_grad_(True)
    loss = heatmap_loss(name, pb, tgt.to(torch.bfloat16), mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=3e-2)
    loss.backward()
    assert pb.grad.dtype == torch.bfloat16 and torch.isfinite(pb.grad.float()).all()


def test_registry_and_errors():
    assert set(LOSSES) == {"mse", "bce", "softmax_ce", "channel_ce"}
    assert heatmap_loss("mse", MSE_PRED, MSE_TGT, ALL, foreground_weight=3.0).item() == \
        pytest.approx(mse_heatmap_loss(MSE_PRED, MSE_TGT, ALL, foreground_weight=3.0).item())
    with pytest.raises(ValueError, match="bce.*mse.*softmax_ce"):
        heatmap_loss("l1", MSE_PRED, MSE_TGT, ALL)
    with pytest.raises(ValueError):
        mse_heatmap_loss(MSE_PRED, MSE_TGT[:, :1], ALL)
    with pytest.raises(ValueError):
        mse_heatmap_loss(MSE_PRED, MSE_TGT, torch.ones(1, 3, dtype=torch.bool))


def test_channel_ce_equals_the_released_code_loss():
    """channel_ce is nn.CrossEntropyLoss()(pred, binary disc heatmaps) of the released code."""
    from ddpm_landmarks.heatmaps.losses import channel_softmax_ce_loss
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.rand(2, 3, 8, 8, generator=g)
    discs = (target > 0.5).float()
    expected = torch.nn.CrossEntropyLoss()(pred, discs)
    assert torch.allclose(channel_softmax_ce_loss(pred, target, None), expected, atol=1e-6)
    # A masked channel leaves the softmax: the loss of the other channels alone.
    mask = torch.tensor([[True, False, True], [True, True, True]])
    pred_masked = pred.clone()
    pred_masked[0, 1] = -1e9
    discs_masked = discs.clone()
    discs_masked[0, 1] = 0
    expected = torch.nn.CrossEntropyLoss()(pred_masked, discs_masked)
    assert torch.allclose(channel_softmax_ce_loss(pred, target, mask), expected, atol=1e-6)
    # Hand value: one pixel, two channels, target channel 0: -log(e^2 / (e^2 + e^0)).
    p = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    t = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert channel_softmax_ce_loss(p, t, None).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)
