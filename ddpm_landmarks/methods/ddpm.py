"""DDPM pretraining (Ho et al. 2020) of a UNet2DModel on unlabelled x-rays.

    method = DDPMMethod(cfg)            # cfg.model, cfg.diffusion, cfg.data.image_size
    loss, logs = method.loss(model, batch)  # batch: (B, 1, H, W) in [-1, 1]

The paper's released code: T = 500, linear betas 1e-4..0.02, epsilon prediction, plain MSE,
t drawn from [1, T) (diffusion.min_timestep=1) and images diffused in [0, 1]
(diffusion.image_range=unit: the batch's [-1, 1] mapped to (x + 1) / 2 before noising).
v-prediction, x0-prediction and min-SNR weighting (Hang et al. 2023) are options on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torchvision.utils import make_grid

from ddpm_landmarks.config.pretrain import DiffusionConfig, ModelConfig
from ddpm_landmarks.methods.base import Method, this_process_slice
from ddpm_landmarks.models.artifacts import FORMATS, weights_folder
from ddpm_landmarks.models.unet import build_unet, denoise, fold_images, unet_fold
from ddpm_landmarks.utils.atomic import atomic_directory
from ddpm_landmarks.utils.modules import unwrap

EXPORT = FORMATS["ddpm_unet"]
RECON_FRACTIONS = (0.1, 0.4, 0.8)   # of T: t = 50, 200, 400 at the paper's T = 500
SAMPLE_SEED = 1234                  # fixed, so sample grids are comparable over training


# ----------------------------------------------------------------------------------------------
# Pure pieces (unit-tested by hand)
# ----------------------------------------------------------------------------------------------

def snr_of(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at timesteps t (float32)."""
    a = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return a / (1.0 - a)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, snr: torch.Tensor,
                   prediction_type: str, min_snr_gamma: float | None) -> torch.Tensor:
    """Mean over the batch of (weighted) per-sample MSE.

    Min-SNR-gamma (Hang et al. 2023) caps the weight of low-noise timesteps. Expressed for the
    epsilon loss it is min(SNR, g) / SNR; the v loss equals (SNR + 1) x the x0 loss, hence
    min(SNR, g) / (SNR + 1); the x0 loss itself gets min(SNR, g).
    """
    # float32 even under autocast: the loss is a mean over many small squared errors.
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is None:
        return mse.mean()
    snr = snr.float()
    if prediction_type == "epsilon":
        weight = (min_snr_gamma / snr).clamp(max=1.0)   # = min(SNR, g) / SNR, finite at SNR = 0
    elif prediction_type == "v_prediction":
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1.0)
    elif prediction_type == "sample":
        weight = snr.clamp(max=min_snr_gamma)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return (weight * mse).mean()


def predict_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """Clean-image estimate from one network output; alpha_bar broadcastable to x_t."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def to_image_range(images: torch.Tensor, image_range: str) -> torch.Tensor:
    """Network input in [-1, 1] (the data's) -> the range the U-Net diffuses (module doc)."""
    if image_range == "signed":
        return images
    if image_range == "unit":
        return (images + 1) * 0.5
    raise ValueError(f"unknown image_range {image_range!r}; valid: signed, unit")


@torch.no_grad()
def unet_decoder_features(model: torch.nn.Module, images: torch.Tensor,
                          timestep: int = 0) -> list[torch.Tensor]:
    """The mid block's and every up block's output of a UNet2DModel at `timestep` (0 = clean
    input) (tiny at 64 px: 64@16, 64@32, 64@64, 32@64 channels@side): the hypercolumn of the
    landmark probe and of the transferability estimate (studies/transferability.py). The
    last features alone (conv_out's input, what fine-tuning's head sees) probe worse than a
    random network's hypercolumn: at t = 0 they only encode noise. A module-level function so
    that a fine-tuned regressor's U-Net (conv_out replaced, time embedding maybe dropped) gives
    the same features."""
    unet = unwrap(model)
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [block.register_forward_hook(keep) for block in (unet.mid_block, *unet.up_blocks)]
    try:
        dtype = next(unet.parameters()).dtype
        t = torch.full((images.shape[0],), int(timestep), dtype=torch.long, device=images.device)
        unet(fold_images(images.to(dtype), unet_fold(unet)), t)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

class DDPMMethod(Method):
    def __init__(self, cfg: Any):
        """cfg: a PretrainConfig, or anything with .model, .diffusion and .data.image_size."""
        self.model_cfg: ModelConfig = cfg.model
        self.cfg: DiffusionConfig = cfg.diffusion
        self.model: UNet2DModel = build_unet(cfg.model, image_size=cfg.data.image_size)
        d = self.cfg
        self.scheduler = DDPMScheduler(
            num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
            beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=d.prediction_type,
            clip_sample=True, clip_sample_range=1.0)     # data in [-1, 1] (or [0, 1])
        to_image_range(torch.zeros(1), d.image_range)   # ValueError for an unknown range
        if not 0 <= d.min_timestep < d.num_train_timesteps:
            raise ValueError(f"diffusion.min_timestep={d.min_timestep} must be in [0, "
                             f"num_train_timesteps={d.num_train_timesteps})")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    # -- training ---------------------------------------------------------------------------

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the diffused range -> [0, 1] on the CPU, for image grids."""
        lo = -1.0 if self.cfg.image_range == "signed" else 0.0
        return ((x.float().clamp(lo, 1.0) - lo) / (1.0 - lo)).cpu()

    def loss(self, model: torch.nn.Module, batch: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = to_image_range(batch, self.cfg.image_range)
        b, device = x0.shape[0], x0.device
        # Draw for the global batch and keep this process's slice (methods.base), on the
        # generator's device, then move: a CPU generator can drive a GPU run.
        total, mine = this_process_slice(b)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(self.cfg.min_timestep, self.num_train_timesteps, (total,),
                          generator=generator, device=gen_device)[mine].to(device)
        noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=gen_device,
                            dtype=x0.dtype)[mine].to(device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.cfg.prediction_type == "epsilon":
            target = noise
        elif self.cfg.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        pred = denoise(model, x_t, t)
        snr = snr_of(self.scheduler.alphas_cumprod, t)
        loss = diffusion_loss(pred, target, snr, self.cfg.prediction_type, self.cfg.min_snr_gamma)
        # .item() syncs with the GPU once per micro-batch; cheap next to a U-Net step.
        return loss, {"loss": loss.item(), "t_mean": t.float().mean().item()}

    # -- images -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, num: int, size: tuple[int, int],
               steps: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
        """DDIM (eta 0) samples in the diffused range, (num, 1, H, W), from a fixed-seed
        starting noise."""
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps, device=device)
        gen = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((num, 1, *size), generator=gen).to(device=device, dtype=dtype)
        for t in ddim.timesteps:
            out = denoise(model, x, t)
            x = ddim.step(out, t, x, eta=0.0).prev_sample
        return x.clamp(-1.0 if self.cfg.image_range == "signed" else 0.0, 1.0)

    @torch.no_grad()
    def log_images(self, model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"samples": DDIM samples, "reconstructions": rows [input | noisy t | x0-hat t ...]}."""
        was_training = model.training
        model.eval()
        try:
            n = self.cfg.num_samples
            samples = self.sample(model, n, tuple(batch.shape[-2:]), self.cfg.sample_steps)

            T = self.num_train_timesteps
            x0 = to_image_range(batch[:n], self.cfg.image_range).to(next(model.parameters()).dtype)
            gen = torch.Generator("cpu").manual_seed(SAMPLE_SEED + 1)
            alphas = self.scheduler.alphas_cumprod.to(x0.device, torch.float32)
            columns = [x0]
            for frac in RECON_FRACTIONS:
                t = torch.full((x0.shape[0],), min(round(frac * T), T - 1),
                               dtype=torch.long, device=x0.device)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                x_t = self.scheduler.add_noise(x0, noise, t)
                pred = denoise(model, x_t, t).float()
                x0_hat = predict_x0(pred, x_t.float(), alphas[t].view(-1, 1, 1, 1),
                                    self.cfg.prediction_type)
                columns += [x_t, x0_hat]
            # (n, cols, 1, H, W) -> row-major: one row per image.
            recon = torch.stack([self.to_display(c) for c in columns], dim=1).flatten(0, 1)
            return {
                "samples": make_grid(self.to_display(samples), nrow=min(n, 8), padding=2),
                "reconstructions": make_grid(recon, nrow=len(columns), padding=2),
            }
        finally:
            model.train(was_training)

    # -- landmark probe (training/probe.py) ------------------------------------------------

    @torch.no_grad()
    def probe_features(self, model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """Decoder activations at t = 0 (clean input, in the diffused range), see
        unet_decoder_features."""
        return unet_decoder_features(model, to_image_range(images, self.cfg.image_range))

    # -- export -----------------------------------------------------------------------------

    def export(self, model: torch.nn.Module, out_dir: Path, config_dict: dict) -> None:
        """out_dir/{config.json, diffusion_pytorch_model.safetensors, scheduler/,
        ddpm_landmarks_config.yaml} (models/artifacts.py kind "ddpm_unet").

        Written into a temporary folder next to out_dir and renamed into place. A previous export
        is first renamed aside and removed after the swap, so out_dir is, at any moment, the old
        export, the new one, or (between two renames) missing -- never half-written.
        """
        with atomic_directory(out_dir) as tmp:
            unwrap(model).save_pretrained(tmp, safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / EXPORT.config_file).write_text(yaml.safe_dump(config_dict, sort_keys=False))


def load_exported(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """(model, scheduler, resolved run config) of a folder written by DDPMMethod.export (or its
    pretraining run folder)."""
    path = weights_folder(path, "ddpm_unet", "export")
    model = UNet2DModel.from_pretrained(path)
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    config_file = path / EXPORT.config_file
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return model, scheduler, config or {}
