"""Pretraining methods: name -> factory(cfg) -> Method (see methods.base). One file each:

    ddpm      methods/ddpm.py      diffusion pretraining of a UNet2DModel
    simclr    methods/simclr.py    SimCLR (NT-Xent) on an smp encoder
    simclr_v2 methods/simclr_v2.py SimCLR v2 (NT-Xent, 3-layer projection head)
    moco_v2   methods/moco_v2.py   MoCo v2 (momentum encoder + key queue) on an smp encoder
    moco_v3   methods/moco_v3.py   MoCo v3 (momentum encoder, predictor, symmetric loss)
    dino      methods/dino.py      DINO (self-distillation: momentum teacher, centering,
                                   multi-crop)

The SSL methods (SSL_METHODS) train on two augmented views per image (data.ssl_views; DINO
also on small local crops) and export an smp encoder (methods.ssl_base). Factories import their module lazily, so listing the
methods does not import diffusers etc.
"""
from __future__ import annotations

from typing import Any, Callable

from ddpm_landmarks.methods.base import Method


def _ddpm(cfg: Any) -> Method:
    from ddpm_landmarks.methods.ddpm import DDPMMethod
    return DDPMMethod(cfg)


def _simclr(cfg: Any) -> Method:
    from ddpm_landmarks.methods.simclr import SimCLRMethod
    return SimCLRMethod(cfg)


def _simclr_v2(cfg: Any) -> Method:
    from ddpm_landmarks.methods.simclr_v2 import SimCLRv2Method
    return SimCLRv2Method(cfg)


def _dino(cfg: Any) -> Method:
    from ddpm_landmarks.methods.dino import DINOMethod
    return DINOMethod(cfg)


def _moco_v2(cfg: Any) -> Method:
    from ddpm_landmarks.methods.moco_v2 import MoCoV2Method
    return MoCoV2Method(cfg)


def _moco_v3(cfg: Any) -> Method:
    from ddpm_landmarks.methods.moco_v3 import MoCoV3Method
    return MoCoV3Method(cfg)


# cfg is a PretrainConfig (or anything with the same sections the method reads).
PRETRAINING_METHODS: dict[str, Callable[[Any], Method]] = {
    "ddpm": _ddpm,
    "simclr": _simclr,
    "simclr_v2": _simclr_v2,
    "moco_v2": _moco_v2,
    "moco_v3": _moco_v3,
    "dino": _dino,
}

# Methods trained on two views per image ({"view1", "view2"[, "local"]} batches) from cfg.ssl.
SSL_METHODS = ("simclr", "simclr_v2", "moco_v2", "moco_v3", "dino")
# Those that take DINO's local crops (ssl.views.local_crops > 0).
MULTI_CROP_METHODS = ("dino",)
