"""DINO and SimCLR v2 (methods/dino.py, simclr_v2.py): the DINO loss and center by hand and
against lightly's DINOLoss, the methods' losses on real model outputs against lightly, the
teacher's momentum per optimiser step, DINO's multi-crop views and SimCLR v2's head."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ddpm_landmarks.config.pretrain import (
    PretrainConfig,
    ViewConfig,
    resolve_ssl_config,
)
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.ssl_views import TwoViewImages
from ddpm_landmarks.data.unlabeled import MixedPools, UnlabeledPool
from ddpm_landmarks.methods.dino import dino_loss, update_center
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
from ddpm_landmarks.methods.ssl_base import cosine_momentum

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is in the dev extra")

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ATOL = 1e-6


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- the pure DINO pieces -----------------------------------------------------------------------

def test_dino_loss_by_hand():
    """One image, 2-d outputs. Teacher view 0 = (log 3, 0) at T_t = 1, center 0: target
    (3/4, 1/4). Student views 1 and 2 = (0, 0) at T_s = 1: log-probs (log 1/2, log 1/2), so each
    pair costs log 2 whatever the target. Teacher view 1 = (0, 0): target (1/2, 1/2); student
    view 0 = (log 3, 0): log-probs (log 3/4, log 1/4): cost -(log 3/4 + log 1/4) / 2."""
    t = [torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, 0.0]])]
    s = [torch.tensor([[math.log(3), 0.0]]), torch.zeros(1, 2), torch.zeros(1, 2)]
    pairs = [math.log(2), math.log(2),                        # teacher 0 -> students 1, 2
             -(math.log(0.75) + math.log(0.25)) / 2, math.log(2)]   # teacher 1 -> 0, 2
    assert dino_loss(t, s, torch.zeros(1, 2), 1.0, 1.0).item() == pytest.approx(
        sum(pairs) / 4, rel=1e-6)
    # The center is subtracted from the teacher: centering (log 3, 0) by itself gives (1/2, 1/2).
    centred = dino_loss(t[:1], [s[0], torch.tensor([[0.0, math.log(3)]])],
                        torch.tensor([[math.log(3), 0.0]]), 1.0, 1.0)
    assert centred.item() == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2, rel=1e-6)


def test_update_center_by_hand():
    c = update_center(torch.tensor([[1.0, 0.0]]),
                      [torch.tensor([[0.0, 2.0], [2.0, 2.0]]), torch.tensor([[4.0, 0.0]] * 2)],
                      0.9)
    assert torch.allclose(c, torch.tensor([[0.9 + 0.1 * 2.5, 0.1 * 1.0]]))  # batch mean (2.5, 1)


# Temperatures exact in float32: lightly keeps the teacher's as a float32 tensor.
@pytest.mark.parametrize("t_teacher, t_student, views", [(0.0625, 0.125, 6), (0.5, 0.125, 8),
                                                         (1.0, 1.0, 2)])
def test_dino_loss_and_center_match_lightly(t_teacher, t_student, views):
    dim, batch, momentum = 16, 5, 0.9
    teacher = [randn(batch, dim, seed=i, dtype=torch.float64) for i in range(2)]
    student = [randn(batch, dim, seed=10 + i, dtype=torch.float64).requires_grad_(True)
               for i in range(views)]
    center = randn(1, dim, seed=99, dtype=torch.float64) * 0.1
    ours = dino_loss(teacher, student, center, t_teacher, t_student)
    crit = lightly_loss.DINOLoss(dim, teacher_temp=t_teacher, student_temp=t_student,
                                 warmup_teacher_temp=t_teacher, center_momentum=momentum)
    crit.center = center.clone().view(1, 1, dim)
    theirs = crit(teacher, student)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    for a, b in zip(torch.autograd.grad(ours, student), torch.autograd.grad(theirs, student)):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(update_center(center, teacher, momentum), crit.center.view(1, dim),
                          atol=1e-12)


# -- the methods on real model outputs ----------------------------------------------------------

def _method(name: str, **ssl):
    """The method at 32 px, batch 4, hidden width 32 (plus ssl.* values), seed 0."""
    overrides = [f"method={name}", "data.image_size=32", "train.batch_size=4",
                 "ssl.hidden_dim=32"] + [f"ssl.{key}={value}" for key, value in ssl.items()]
    cfg = load_config(None, overrides, cls=PretrainConfig)
    torch.manual_seed(0)
    return PRETRAINING_METHODS[name](cfg)


def _batch(seed: int, local: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"view1": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1,
             "view2": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1}
    if local:
        batch["local"] = torch.rand(4, local, 1, 16, 16, generator=g) * 2 - 1
    return batch


def test_dino_method_loss_matches_lightly():
    """Two steps (the center moves in between): our loss equals lightly's DINOLoss on the same
    student / teacher outputs, and the method's center equals lightly's updated center."""
    method = _method("dino", proj_dim=64, bottleneck_dim=16, teacher_temperature=0.07)
    net, c = method.model, method.cfg
    crit = lightly_loss.DINOLoss(c.proj_dim, teacher_temp=c.teacher_temperature,
                                 warmup_teacher_temp=c.teacher_temperature,
                                 student_temp=c.temperature, center_momentum=c.center_momentum)
    for step in range(2):
        batch = _batch(step, local=3)
        crit.center = net.center.clone().view(1, 1, -1)
        loss, logs = method.loss(net, batch)
        x1, x2 = method.views(batch, net)
        with torch.no_grad():                          # after this step's teacher update
            student_g, student_l = net(torch.cat([x1, x2]), method.local_views(batch, net))
            teacher = net.teacher(torch.cat([x1, x2]))
        expected = crit(list(teacher.split(4)), list(student_g.split(4)) +
                        list(student_l.split(4)))
        assert loss.item() == pytest.approx(expected.item(), abs=ATOL), step
        assert torch.allclose(net.center, crit.center.view(1, -1), atol=ATOL), step
        assert logs["views"] == 5.0                    # 2 global + 3 local student views


def test_dino_teacher_follows_by_momentum_once_per_step():
    method = _method("dino", proj_dim=16, bottleneck_dim=8, momentum=0.9, momentum_end=0.9)
    net = method.model
    assert all(torch.equal(a, b) for a, b in zip(net.encoder.parameters(),
                                                 net.teacher_encoder.parameters()))
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in net.teacher_encoder.parameters()]
    method.loss(net, _batch(0))
    for b, t, s in zip(before, net.teacher_encoder.parameters(), net.encoder.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    assert net.step.item() == 1 and not any(p.requires_grad for p in net.teacher_head.parameters())
    assert method.momentum_at(0) == cosine_momentum(0, method.max_steps, 0.9, 0.9)


def test_simclr_v2_method_loss_matches_lightly_and_has_a_three_layer_head():
    method = _method("simclr_v2")                      # hidden_dim 32 (the default: 512)
    linears = [m for m in method.model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 32),
                                                                   (32, 128)]
    batch = _batch(0)
    loss, _ = method.loss(method.model, batch)
    with torch.no_grad():
        z = method.model(torch.cat([batch["view1"], batch["view2"]]))
    expected = lightly_loss.NTXentLoss(temperature=0.5)(z[:4], z[4:])
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)


def test_defaults_of_the_new_methods():
    dino = resolve_ssl_config("dino", PretrainConfig().ssl, encoder_channels=2208)
    assert (dino.temperature, dino.teacher_temperature, dino.center_momentum, dino.proj_dim,
            dino.hidden_dim, dino.momentum, dino.proj_layers) == (0.1, 0.04, 0.9, 65536, 2048,
                                                                  0.996, 3)
    v2 = resolve_ssl_config("simclr_v2", PretrainConfig().ssl, encoder_channels=2208)
    assert (v2.temperature, v2.proj_dim, v2.hidden_dim, v2.proj_layers) == (0.5, 128, 2208, 3)


# -- multi-crop views ---------------------------------------------------------------------------

def test_multi_crop_views(tmp_path: Path):
    folder = tmp_path / "pool"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.tile(np.arange(0, 240, 3, dtype=np.uint8), (60, 1)))
    pools = MixedPools([UnlabeledPool(name="p", root=folder, paths=[folder / "a.png"])])
    views = ViewConfig(global_size=24, local_crops=3, local_size=8, rotation_deg=0.0,
                       jitter_prob=0.0, blur_prob=0.0, noise_std=0.0)
    item = TwoViewImages(pools, 32, views, seed=0)[0]
    assert item["view1"].shape == (1, 24, 24) and item["local"].shape == (3, 1, 8, 8)
    assert item["local"].min() >= -1 and item["local"].max() <= 1
    # A horizontal ramp: a local crop of 5-40 % of the grid spans a narrower range of gray.
    spans = [float(v.max() - v.min()) for v in item["local"]]
    assert max(spans) < float(item["view1"].max() - item["view1"].min()) + 1e-6
    plain = TwoViewImages(pools, 32, ViewConfig(), seed=0)[0]
    assert set(plain) == {"view1", "view2"}


def test_dino_trains_through_the_engine_and_exports_its_student(tmp_path):
    """Two engine steps with local crops: the teacher moved, the export is the student's
    encoder (smp layout), the momentum is logged per optimiser step."""
    from ddpm_landmarks.config.training import OptimConfig, TrainConfig
    from ddpm_landmarks.training.engine import Trainer, reset_accelerate_state

    class Crops(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"view1": torch.rand(1, 32, 32, generator=g) * 2 - 1,
                    "view2": torch.rand(1, 32, 32, generator=g) * 2 - 1,
                    "local": torch.rand(2, 1, 16, 16, generator=g) * 2 - 1}

    reset_accelerate_state()
    method = _method("dino", proj_dim=16, bottleneck_dim=8)
    method.max_steps = 2                               # the momentum cosine's length
    cfg = TrainConfig(max_steps=2, batch_size=2, grad_accum=1, ema=False, checkpoint_every=0,
                      num_workers=0, log_every=1, image_every=0, seed=0)
    teacher0 = [p.clone() for p in method.model.teacher_head.parameters()]
    Trainer(method, Crops(), cfg, OptimConfig(lr=1e-3, warmup_steps=0), tmp_path / "run",
            {"method": "dino"}).fit()
    assert any(not torch.equal(a, b) for a, b in zip(teacher0,
                                                     method.model.teacher_head.parameters()))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [r["train/momentum"] for r in logged] == pytest.approx(
        [cosine_momentum(s, 2, 0.996) for s in range(2)])
    out = tmp_path / "export"
    method.export(method.model, out, {"method": "dino"})
    assert json.loads((out / "encoder.json").read_text())["method"] == "dino"
