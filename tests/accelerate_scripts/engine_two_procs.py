"""Toy method + data for the engine tests; run as a script under `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_scripts/engine_two_procs.py \
        OUT_DIR --batch-size 4 --max-steps 4

writes OUT_DIR/result.pt (final weights, EMA weights, logged history) from the main process.
tests/test_engine.py imports the toy pieces from this file, so both sides train the same thing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the project root

from ddpm_landmarks.config.training import OptimConfig, TrainConfig  # noqa: E402
from ddpm_landmarks.training.engine import Trainer  # noqa: E402


class ToyMethod:
    """A small conv net regressing a fixed function of the image; no batch-dependent layers.

    noise=True adds generator-drawn input noise (exercises the engine's per-step generator).
    """

    def __init__(self, seed: int = 0, noise: bool = False):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(4, 1, 3, padding=1))
        self.noise = noise
        self.exported = None

    def loss(self, model, batch, generator=None):
        x = batch
        if self.noise:
            x = x + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)
        loss = F.mse_loss(model(x), batch.flip(-1))
        return loss, {"mse": float(loss.detach())}

    def log_images(self, model, batch):
        return {"pred": model(batch[:2]).clamp(0, 1)}

    def export(self, model, out_dir: Path, config_dict: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.exported = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(self.exported, out_dir / "weights.pt")


class ToyImages(Dataset):
    """Deterministic random images; item i is the same on every process."""

    def __init__(self, n: int = 24, size: int = 8, seed: int = 0):
        self.images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def run(out_dir: Path, batch_size: int, max_steps: int, n_images: int = 24,
        shuffle: bool = True) -> dict:
    """Train the toy method; the same call in 1 process or under accelerate launch."""
    method = ToyMethod(seed=0)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=1, ema_decay=0.9,
                      checkpoint_every=2, keep_checkpoints=2, num_workers=0, log_every=1,
                      image_every=0, seed=0)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, max_grad_norm=1.0)
    trainer = Trainer(method, ToyImages(n_images), cfg, optim, Path(out_dir) / "run",
                      {"toy": True}, shuffle=shuffle)
    summary = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "ema": method.exported, "history": trainer.history, "summary": summary,
            "num_processes": trainer.accelerator.num_processes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--n-images", type=int, default=24)
    parser.add_argument("--no-shuffle", action="store_true")
    args = parser.parse_args()
    result = run(args.out_dir, args.batch_size, args.max_steps, args.n_images,
                 shuffle=not args.no_shuffle)
    if PartialState().is_main_process:
        torch.save(result, args.out_dir / "result.pt")


if __name__ == "__main__":
    main()
