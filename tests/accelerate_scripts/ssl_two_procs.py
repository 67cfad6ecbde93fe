"""Cross-process pieces of the SSL baselines, run under `accelerate launch` with 2 processes:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        tests/accelerate_scripts/ssl_two_procs.py OUT_DIR [--engine moco_v2]

Every process writes OUT_DIR/rank{r}.pt; tests/test_ssl_methods.py compares them with the
single-process values it computes itself from the same fixed inputs (fixed_inputs below):
- SimCLR: the loss of fixed embeddings gathered with gradient, and their local gradients;
  SimCLRMethod.loss through a DDP-wrapped BN-free model: loss and averaged parameter gradients;
- MoCo v3: the loss against gathered keys and the local query gradients;
- MoCo v2: the shuffled key computation (shuffled_keys) and the queue after enqueueing the
  global batch of keys;
- --engine METHOD: two optimiser steps of METHOD in the engine (DDP, buffers, key paths).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the project root

from ddpm_landmarks.config.pretrain import PretrainConfig  # noqa: E402
from ddpm_landmarks.methods.moco_v2 import Queue, shuffled_keys  # noqa: E402
from ddpm_landmarks.methods.moco_v3 import moco_v3_loss  # noqa: E402
from ddpm_landmarks.methods.simclr import SimCLRMethod, global_nt_xent  # noqa: E402
from ddpm_landmarks.methods.ssl_base import gather_no_grad  # noqa: E402

GLOBAL_BATCH, DIM, TEMPERATURE = 6, 5, 0.5


def fixed_inputs() -> dict:
    """The global batch every check uses (the same on every process and in the test)."""
    g = torch.Generator().manual_seed(1234)
    return {"z1": torch.randn(GLOBAL_BATCH, DIM, generator=g),
            "z2": torch.randn(GLOBAL_BATCH, DIM, generator=g),
            "x1": torch.rand(GLOBAL_BATCH, 1, 4, 4, generator=g) * 2 - 1,
            "x2": torch.rand(GLOBAL_BATCH, 1, 4, 4, generator=g) * 2 - 1}


def tiny_model() -> nn.Module:
    """BN-free stand-in for SimCLRModel: (B, 1, 4, 4) -> (B, DIM)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, DIM))


def simclr_method() -> SimCLRMethod:
    cfg = PretrainConfig(method="simclr")
    cfg.ssl.temperature = TEMPERATURE
    cfg.train.batch_size = GLOBAL_BATCH // 2
    return SimCLRMethod(cfg)


def pieces(rank: int, size: int) -> dict:
    data = fixed_inputs()
    b = GLOBAL_BATCH // size
    mine = slice(rank * b, (rank + 1) * b)
    out = {}

    # SimCLR: fixed embeddings, gathered with gradient.
    z1 = data["z1"][mine].clone().requires_grad_(True)
    z2 = data["z2"][mine].clone().requires_grad_(True)
    loss, _, _ = global_nt_xent(z1, z2, TEMPERATURE)
    loss.backward()
    out.update(simclr_loss=loss.item(), simclr_grad1=z1.grad, simclr_grad2=z2.grad)

    # SimCLRMethod.loss through DDP (gradients averaged over processes by DDP).
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model())
    method = simclr_method()
    loss, _ = method.loss(ddp, {"view1": data["x1"][mine], "view2": data["x2"][mine]})
    loss.backward()
    out.update(ddp_loss=loss.item(),
               ddp_grads={n: p.grad.clone() for n, p in ddp.module.named_parameters()})

    # MoCo v3: local queries against the gathered keys (no gradient through keys).
    q = data["z1"][mine].clone().requires_grad_(True)
    k_all = gather_no_grad(data["z2"][mine])
    loss = moco_v3_loss(q, k_all, TEMPERATURE, offset=rank * b)
    loss.backward()
    out.update(moco_v3_loss=loss.item(), moco_v3_grad=q.grad, moco_v3_keys=k_all)

    # MoCo v2: shuffled key computation and the queue.
    seen = []

    def key_fn(x):
        seen.append(x.clone())
        return x.flatten(1) * 2.0 + 1.0

    gen = torch.Generator().manual_seed(7)
    out["shuffled_keys"] = shuffled_keys(key_fn, data["x1"][mine], gen)
    out["seen"] = torch.cat(seen)
    torch.manual_seed(3)
    queue = Queue(8, DIM)
    queue.enqueue(gather_no_grad(data["z1"][mine]))
    out.update(queue_keys=queue.keys.clone(), queue_ptr=queue.ptr.clone())
    return out


class ToyViews(torch.utils.data.Dataset):
    """Fixed random two-view items at 32 px (the same on every process)."""

    def __init__(self, n: int = 8, size: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 2, 1, size, size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"view1": self.x[i, 0], "view2": self.x[i, 1]}


def engine_run(out_dir: Path, name: str) -> dict:
    """Two optimiser steps of one SSL method in the engine, batch 2 per process.

    One per launch: fit() ends with accelerator.end_training(), which destroys the process
    group (re-initialising it in the same processes is not reliable)."""
    from ddpm_landmarks.config.training import OptimConfig, TrainConfig
    from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
    from ddpm_landmarks.training.engine import Trainer
    cfg = PretrainConfig(method=name)
    cfg.data.image_size = 32
    cfg.ssl.queue_size = 8
    cfg.ssl.hidden_dim = 32
    cfg.train = TrainConfig(max_steps=2, batch_size=2, ema=False, checkpoint_every=0,
                            num_workers=0, log_every=1, image_every=0, seed=0)
    torch.manual_seed(0)
    method = PRETRAINING_METHODS[name](cfg)
    trainer = Trainer(method, ToyViews(), cfg.train, OptimConfig(lr=1e-3, warmup_steps=0),
                      out_dir / name, {"method": name})
    summary = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {"method": name, "loss": summary["loss"], "step": summary["step"],
            "history": trainer.history,
            "buffers": {k: v.clone() for k, v in model.named_buffers()
                        if k in ("queue.keys", "queue.ptr", "step")},
            "encoder_conv1": model.encoder.conv1.weight.detach().clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--engine", default="", help="an SSL method to train for 2 steps")
    args = parser.parse_args()
    # cpu=... as the engine's Accelerator will ask: the state is a process-wide singleton.
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    rank = state.process_index
    out = pieces(rank, state.num_processes)
    if args.engine:
        out["engine"] = engine_run(args.out_dir, args.engine)
    torch.save(out, args.out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
