"""Our SSL losses against an independent implementation: lightly's (tests only, `dev` extra).

tests/test_ssl_losses.py checks each loss against values written out from the published
formulas; here the same functions, and the methods' `loss` on real model outputs, are compared
with lightly 1.6 on random fixed inputs. Conventions, ours -> lightly's:

- SimCLR: `nt_xent_loss(z1, z2, t)` = `NTXentLoss(temperature=t)(z1, z2)`. Both normalise,
  divide cosine similarities by t, and use the 2N - 1 other projections as the denominator
  (lightly drops an anchor's own column, we set it to -inf). Gathered across processes: our
  `global_nt_xent` = `NTXentLoss(t, gather_distributed=True)` on each process, loss and
  gradients (a real 2-process gloo group).
- MoCo v2: `info_nce_loss(q, k, queue, t)` followed by `Queue.enqueue(normalize(k))` (what
  MoCoV2Method.loss does) = `NTXentLoss(t, memory_bank_size=(K, d))(q, k)`: lightly's memory
  bank mode is MoCo's InfoNCE (positive q.k, negatives the bank before this batch is added),
  then the normalised keys are enqueued. lightly's bank drops the keys that do not fit before
  the end of the bank and restarts at 0, where our queue wraps; with K a multiple of the global
  batch (which MoCoV2Method requires) the two are the same FIFO.
- MoCo v3: lightly 1.6 has no MoCo v3 loss (its NTXentLoss without a bank also counts
  query-query similarities). MoCo v3's ctr(q, k) (Chen, Xie, He 2021, Algorithm 1) is InfoNCE
  where query i's negatives are the other keys of the batch, so it is composed here from
  lightly's memory-bank InfoNCE, one query at a time with the bank = the other keys, times
  MoCo v3's 2 t factor (which lightly does not have).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is in the dev extra")
NTXentLoss = lightly_loss.NTXentLoss


from ddpm_landmarks.config.pretrain import PretrainConfig  # noqa: E402
from ddpm_landmarks.methods.moco_v2 import Queue, info_nce_loss  # noqa: E402
from ddpm_landmarks.methods.moco_v3 import moco_v3_loss  # noqa: E402
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS  # noqa: E402
from ddpm_landmarks.methods.simclr import global_nt_xent, nt_xent_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ATOL = 1e-6


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def lightly_moco_v3(q: torch.Tensor, k: torch.Tensor, temperature: float,
                    offset: int = 0) -> torch.Tensor:
    """MoCo v3's ctr(q, k) from lightly's InfoNCE: query i, positive k[offset + i], negatives
    the other rows of k (a memory bank holding exactly those), mean over i, times 2 t."""
    losses = []
    for i in range(q.shape[0]):
        j = offset + i
        others = torch.cat([k[:j], k[j + 1:]])
        crit = NTXentLoss(temperature=temperature, memory_bank_size=tuple(others.shape))
        crit.memory_bank.bank = F.normalize(others.detach(), dim=1)     # q's dtype
        losses.append(crit(q[i:i + 1], k[j:j + 1]))
    return torch.stack(losses).mean() * (2.0 * temperature)


# -- the pure losses -----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, batch, dim", [(0.1, 5, 8), (0.5, 16, 128), (1.0, 3, 2)])
def test_nt_xent_matches_lightly(temperature, batch, dim):
    z1 = randn(batch, dim, seed=1, dtype=torch.float64).requires_grad_(True)
    z2 = (randn(batch, dim, seed=2, dtype=torch.float64) * 3).requires_grad_(True)
    ours = nt_xent_loss(z1, z2, temperature)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    theirs = NTXentLoss(temperature=temperature)(z1, z2)
    g_theirs = torch.autograd.grad(theirs, (z1, z2))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-12)


def _gathered_worker(rank: int, world: int, init_file: str, out_dir: str, temperature: float,
                     batch: int, dim: int) -> None:
    """One process of the gloo group: our global_nt_xent and lightly's gathered NTXentLoss on
    this process's block of a fixed global batch; losses and local gradients to rank{r}.pt."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        z1_all, z2_all = randn(world * batch, dim, seed=3), randn(world * batch, dim, seed=4)
        mine = slice(rank * batch, (rank + 1) * batch)
        out = {}
        for name in ("ours", "lightly"):
            z1 = z1_all[mine].clone().requires_grad_(True)
            z2 = z2_all[mine].clone().requires_grad_(True)
            if name == "ours":
                loss = global_nt_xent(z1, z2, temperature)[0]
            else:
                loss = NTXentLoss(temperature=temperature, gather_distributed=True)(z1, z2)
            loss.backward()
            out[name] = (loss.item(), z1.grad.clone(), z2.grad.clone())
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_nt_xent_matches_lightly_on_two_processes(tmp_path):
    """2 gloo processes x 4 samples: on each process our loss and the gradients of its own
    projections (through the gather) equal lightly's gather_distributed=True ones."""
    import torch.multiprocessing as mp
    temperature, batch, dim, world = 0.3, 4, 16, 2
    mp.spawn(_gathered_worker, nprocs=world, join=True,
             args=(world, str(tmp_path / "init"), str(tmp_path), temperature, batch, dim))
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        (loss, g1, g2), (l_loss, l_g1, l_g2) = out["ours"], out["lightly"]
        assert loss == pytest.approx(l_loss, abs=ATOL), rank
        assert torch.allclose(g1, l_g1, atol=ATOL) and torch.allclose(g2, l_g2, atol=ATOL)
    # And the gathered form is the loss of the whole batch on one process (lightly's view).
    whole = NTXentLoss(temperature=temperature)(randn(world * batch, dim, seed=3),
                                                randn(world * batch, dim, seed=4))
    mean = sum(torch.load(tmp_path / f"rank{r}.pt")["lightly"][0] for r in range(world)) / world
    assert mean == pytest.approx(whole.item(), abs=ATOL)


@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_info_nce_with_queue_matches_lightly_memory_bank(temperature):
    """5 steps of batch 4 into a queue of 8 (two wrap-arounds): loss, query gradient, queue
    contents and pointer equal lightly's memory bank step by step."""
    batch, dim, size = 4, 16, 8
    torch.manual_seed(0)
    queue = Queue(size, dim)
    crit = NTXentLoss(temperature=temperature, memory_bank_size=(size, dim))
    crit.memory_bank.bank = queue.keys.clone()            # the same random start
    for step in range(5):
        q = randn(batch, dim, seed=10 + step).requires_grad_(True)
        k = randn(batch, dim, seed=20 + step) * 2
        ours = info_nce_loss(q, k, queue.keys.clone(), temperature)
        (g_ours,) = torch.autograd.grad(ours, q)
        queue.enqueue(F.normalize(k, dim=1))
        theirs = crit(q, k)                                 # q requires grad: lightly enqueues
        (g_theirs,) = torch.autograd.grad(theirs, q)
        assert ours.item() == pytest.approx(theirs.item(), abs=ATOL), step
        assert torch.allclose(g_ours, g_theirs, atol=ATOL), step
        assert torch.allclose(queue.keys, crit.memory_bank.bank, atol=ATOL), step
        assert queue.ptr.item() == crit.memory_bank.bank_ptr.item(), step


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_moco_v3_loss_matches_lightly_composition(temperature):
    q = randn(6, 32, seed=5, dtype=torch.float64).requires_grad_(True)
    k = randn(6, 32, seed=6, dtype=torch.float64)
    ours = moco_v3_loss(q, k, temperature)
    theirs = lightly_moco_v3(q, k, temperature)
    assert ours.item() == pytest.approx(theirs.item(), abs=ATOL)
    (g_ours,) = torch.autograd.grad(ours, q)
    (g_theirs,) = torch.autograd.grad(theirs, q)
    assert torch.allclose(g_ours, g_theirs, atol=ATOL)
    # Process 1 of 2: its 3 queries against all 6 gathered keys, its own keys at offset 3.
    part = moco_v3_loss(q[3:], k, temperature, offset=3)
    assert part.item() == pytest.approx(lightly_moco_v3(q[3:], k, temperature, 3).item(),
                                        abs=ATOL)


# -- the methods' loss on real model outputs -----------------------------------------------------

def _method(name: str, **ssl):
    cfg = PretrainConfig(method=name)
    cfg.data.image_size = 32
    cfg.train.batch_size = 4
    cfg.ssl.hidden_dim = 32
    cfg.ssl.queue_size = 8
    for key, value in ssl.items():
        setattr(cfg.ssl, key, value)
    torch.manual_seed(0)
    return PRETRAINING_METHODS[name](cfg)


def _views(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1,
            "view2": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1}


def test_simclr_method_loss_matches_lightly():
    method = _method("simclr")
    batch = _views(0)
    loss, _ = method.loss(method.model, batch)
    with torch.no_grad():           # one pass over both views, as SimCLRMethod (shared BN)
        z = method.model(torch.cat([batch["view1"], batch["view2"]]))
    expected = NTXentLoss(temperature=method.cfg.temperature)(z[:4], z[4:])
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)


def test_moco_v2_method_loss_matches_lightly():
    method = _method("moco_v2")
    net = method.model
    crit = NTXentLoss(temperature=method.cfg.temperature, memory_bank_size=(8, 128))
    for step in range(3):                                  # the queue fills and wraps
        batch = _views(step)
        crit.memory_bank.bank = net.queue.keys.clone()
        loss, _ = method.loss(net, batch)
        with torch.no_grad():                              # after this step's key update
            q, k = net(batch["view1"]), net.keys(batch["view2"])
        expected = crit(q.requires_grad_(True), k)          # lightly enqueues k
        assert loss.item() == pytest.approx(expected.item(), abs=ATOL), step
        assert torch.allclose(net.queue.keys, crit.memory_bank.bank, atol=ATOL), step


def test_moco_v3_method_loss_matches_lightly():
    method = _method("moco_v3", temperature=0.2)
    net, t = method.model, 0.2
    batch = _views(0)
    loss, _ = method.loss(net, batch)
    x1, x2 = method.views(batch, net)                      # gray repeated to in_channels
    with torch.no_grad():                                  # after this step's momentum update
        q1, q2 = net(x1, x2)
        k1, k2 = net.keys(x1), net.keys(x2)
    expected = lightly_moco_v3(q1, k2, t) + lightly_moco_v3(q2, k1, t)   # symmetric
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
