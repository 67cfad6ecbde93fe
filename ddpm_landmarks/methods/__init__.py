"""Pretraining methods: name -> factory(cfg) -> Method (see methods.base).

Factories import their module lazily, so listing the methods does not import diffusers etc.
"""
from __future__ import annotations

from typing import Any, Callable

from ddpm_landmarks.methods.base import Method


def _ddpm(cfg: Any) -> Method:
    from ddpm_landmarks.methods.ddpm import DDPMMethod
    return DDPMMethod(cfg)


# cfg is a PretrainConfig (or anything with the same sections the method reads).
METHODS: dict[str, Callable[[Any], Method]] = {
    "ddpm": _ddpm,
}

__all__ = ["METHODS", "Method"]
