"""The bare module under the wrappers training puts around it."""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
