"""The authors' released checkpoints (Di Via et al., WACV 2025; Hugging Face repository
Roberto98/X-rays_Self-Supervised_Landmark_Detection) as initialisations, read without running
any of their code.

    model = build_released_regressor(cfg, num_landmarks=19, image_size=256)  # arch released_unet
    state = released_ddpm_state("DDPM/chest/ema_model_epoch800_step6000.pt")

File layouts, as the released code writes them:
  DDPM  ddpm_pretraining/model/training_functions.py (save_model, save_ema_model):
        torch.save({"epoch", "n_iter", "model_state_dict": Unet.state_dict()
                    [, "optimizer_state_dict", "loss"]}, "[ema_]model_epoch{E}_step{N}.pt")
        The EMA and the online file both keep the weights under "model_state_dict"; the
        published ones are the EMA at 6k / 8k / 8k steps (chest / cephalograms / hand).
  SSL   ssl_pretraining/main.py: torch.save(model.backbone.state_dict(),
        "model_epoch{E}_iter{N}.pth"): a bare torchvision DenseNet161 state dict (`features.*`,
        classifier replaced by Identity), key for key smp's densenet161 encoder. Loaded by
        models/smp_regressor.py (init=released_ssl) through encoder_weights.load_encoder_file.

Safety: a torch pickle is read with torch.load(weights_only=True), PyTorch's restricted
unpickler, which rebuilds tensors and plain containers and refuses any other object: a file
that would import or call code when unpickled is an error (ValueError naming the file), never
executed. A .safetensors copy of the same state dict is read as well.

The regressor (ReleasedRegressor) is the released U-Net with our K-channel head in place of its
`final_conv` and our time handling (model.timestep_mode): "drop" = the released fine-tuning
(the network called without a time; the time MLP and every FiLM projection are removed),
"fixed" = t = model.timestep through its time embedding. Its input is the pipeline's [-1, 1]
image mapped to [0, 1] (model.input_range auto = unit: the released training's range).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ddpm_landmarks.models.encoder_weights import check_state
from ddpm_landmarks.models.regressor import make_head
from ddpm_landmarks.models.released_unet import ReleasedUnet

DDPM_KEY = "model_state_dict"
HEAD_PREFIX = "unet.final_conv."


def read_released_file(path: str | Path, what: str = "model.pretrained_path") -> Any:
    """The object saved in a released .pt / .pth (weights_only unpickling) or .safetensors
    file; FileNotFoundError / ValueError naming the file otherwise."""
    file = Path(path)
    if not str(path) or not file.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file (the released checkpoint, "
                                f"e.g. DDPM/chest/ema_model_epoch800_step6000.pt)")
    if file.name.endswith(".safetensors"):
        return load_file(str(file), device="cpu")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:                     # noqa: BLE001 - UnpicklingError and friends
        raise ValueError(f"{what} {file}: not a plain checkpoint of tensors: "
                         f"torch.load(weights_only=True) refused it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). Such a file could "
                         f"run code when unpickled, so it is not read") from None


def released_ddpm_state(path: str | Path, what: str = "model.pretrained_path"
                        ) -> dict[str, torch.Tensor]:
    """The U-Net state dict of a released DDPM checkpoint (module doc), or of a file holding
    that state dict bare (e.g. a .safetensors conversion)."""
    obj = read_released_file(path, what)
    if isinstance(obj, dict) and isinstance(obj.get(DDPM_KEY), dict):
        obj = obj[DDPM_KEY]
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{what} {path}: not a released DDPM checkpoint (no "
                         f"'{DDPM_KEY}' state dict; found {keys})")
    return obj


class ReleasedRegressor(nn.Module):
    """The released U-Net with a K-channel head (module doc). Exposes what every regressor
    does: cfg, num_landmarks, head, head_parameters()."""

    def __init__(self, unet: ReleasedUnet, cfg, num_landmarks: int):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if cfg.timestep_mode not in ("fixed", "drop"):
            raise ValueError(f"unknown timestep_mode {cfg.timestep_mode!r}; valid: fixed, drop")
        if cfg.freeze not in ("none", "encoder", "unet"):
            raise ValueError(f"unknown freeze {cfg.freeze!r}; valid: none, encoder, unet")
        if cfg.noise_input:
            raise ValueError("noise_input is not available for arch released_unet (the released "
                             "checkpoints come without their noise schedule)")
        if cfg.input_range == "auto":
            cfg = dataclasses.replace(cfg, input_range="unit")
        self.cfg = cfg
        self.num_landmarks = num_landmarks
        if cfg.timestep_mode == "drop":
            unet.drop_time()
        dim = unet.final_conv.in_channels
        unet.final_conv = make_head(cfg.head, dim, num_landmarks, unet.cfg.resnet_block_groups)
        self.unet = unet
        frozen = {"encoder": ("init_conv", "time_mlp", "downs", "mid_block1", "mid_attn",
                              "mid_block2"), "unet": None}.get(cfg.freeze, ())
        for name, p in self.unet.named_parameters():
            if frozen is None:
                p.requires_grad_(name.startswith("final_conv."))
            elif name.split(".")[0] in frozen:
                p.requires_grad_(False)

    @property
    def head(self) -> nn.Module:
        return self.unet.final_conv

    def head_parameters(self):
        """The new parameters (optim.head_lr): the K-channel head."""
        yield from self.unet.final_conv.parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [-1, 1] -> (B, K, H, W) raw heatmaps."""
        fixed = self.cfg.timestep_mode == "fixed"
        time = torch.full((images.shape[0],), self.cfg.timestep, dtype=torch.long,
                          device=images.device) if fixed else None
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        return self.unet((images + 1) * 0.5 if self.cfg.input_range == "unit" else images, time)


def build_released_regressor(cfg, num_landmarks: int, image_size: int) -> ReleasedRegressor:
    """arch released_unet: init released_ddpm (the authors' checkpoint at pretrained_path,
    loaded strictly before the head is replaced, as the released fine-tuning does) or scratch
    (the same network at random init: the released code's scratch baseline)."""
    unet = ReleasedUnet(cfg.released)
    if image_size <= 0 or image_size % unet.levels_factor:
        raise ValueError(f"image_size {image_size} must be a positive multiple of "
                         f"{unet.levels_factor} for the released U-Net")
    if cfg.init == "released_ddpm":
        state = released_ddpm_state(cfg.pretrained_path)
        check_state(unet, state, f"released DDPM checkpoint {cfg.pretrained_path}",
                    f"the U-Net of model.released ({dataclasses.asdict(cfg.released)}; the "
                    f"defaults are the published checkpoints' architecture)")
        unet.load_state_dict(state, strict=True)
    elif cfg.init != "scratch":
        raise ValueError(f"model.init={cfg.init} with arch released_unet: use released_ddpm "
                         f"(the authors' checkpoint file) or scratch")
    return ReleasedRegressor(unet, cfg, num_landmarks)
