"""Exponential moving average of a model's parameters, stepped once per optimiser step.

    ema = EMA(model.parameters(), decay=0.9999, warmup=True)
    ema.step(model.parameters())                 # after each optimiser step
    with ema.swapped_in(model.parameters()): export(model)
    tensors, meta = ema.state()                  # safetensors + JSON (training/checkpoint.py)

Decay at optimiser step t (1-based): warmup=True gives 0 at t = 1, then min(decay, t / (9 + t)),
the rule of diffusers' EMAModel (use_ema_warmup=False, its default), so early averages do not
hold the random initialisation for thousands of steps; warmup=False gives `decay` from the
first step, the released DDPM code's EMA (a constant beta). Shadow values are kept in float32
whatever the training precision. The state is plain tensors and numbers: it saves as
safetensors + JSON, never through pickle.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


class EMA:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float,
                 warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow_params = [p.detach().float().clone() for p in parameters]
        self.optimization_step = 0
        self._stored: list[torch.Tensor] = []

    def current_decay(self) -> float:
        """The decay of the most recent step (that of step 1 before any step)."""
        if not self.warmup:
            return self.decay
        t = max(self.optimization_step, 1) - 1          # diffusers' step count
        return 0.0 if t <= 0 else min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.optimization_step += 1
        d = self.current_decay()
        for s, p in zip(self.shadow_params, parameters):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    def to(self, device: torch.device) -> "EMA":
        self.shadow_params = [s.to(device) for s in self.shadow_params]
        return self

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, parameters):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
        """The EMA weights in the model for the block, the trained ones back afterwards."""
        stored = [p.detach().clone() for p in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(parameters, stored):
                    p.copy_(value)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in self.shadow_params)

    # -- checkpoint state ---------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in
                   enumerate(self.shadow_params)}
        meta = {"decay": self.decay, "warmup": self.warmup,
                "optimization_step": self.optimization_step, "count": len(self.shadow_params)}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if int(meta["count"]) != len(self.shadow_params):
            raise ValueError(f"EMA state has {meta['count']} tensors, the model "
                             f"{len(self.shadow_params)}")
        for i, s in enumerate(self.shadow_params):
            value = tensors[f"shadow.{i}"]
            if value.shape != s.shape:
                raise ValueError(f"EMA tensor {i}: shape {tuple(value.shape)}, the model's "
                                 f"parameter {tuple(s.shape)}")
            s.copy_(value)
        self.optimization_step = int(meta["optimization_step"])
