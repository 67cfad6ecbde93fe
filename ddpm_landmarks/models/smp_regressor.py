"""Encoder-decoder baselines: segmentation-models-pytorch U-Net / U-Net++ as K-channel heatmap
regressors, fine-tuned and evaluated by exactly the same code as the DDPM regressor.

    cfg = RegressorConfig(arch="smp_unet", encoder="resnet50", init="imagenet",
                          imagenet_weights="weights/resnet50.pth", gray_adapter="repeat")
    model = build_regressor(cfg, num_landmarks=19, image_size=256)   # models.regressor dispatches
    heatmaps = model(images)            # (B, 1, H, W) in [-1, 1] -> (B, K, H, W), raw values

Architecture (`model.arch`): "smp_unet" = `smp.Unet`, "smp_unetplusplus" = `smp.UnetPlusPlus`,
with any smp encoder by name (`model.encoder`: resnet18/34/50, resnext50_32x4d, densenet161,
vgg19, efficientnet-b0, ..., or a timm "tu-<name>"), `classes=K`, `activation=None`. The output
layer is smp's SegmentationHead (conv3x3 -> K), re-initialised like the DDPM regressor's head
(weights ~ N(0, 1e-3^2), zero bias: initial heatmaps ~0); `model.head` must stay "conv1x1" (the
default; the smp head is fixed). `model.timestep*`/`preset` do not apply; `noise_input` is refused.
The input side must be a multiple of 32 (five stride-2 stages).

Grayscale input (`model.gray_adapter`):
  "repeat":      gray repeated to 3 channels, encoder in_channels = 3.
  "in_channels": encoder in_channels = 1. Pretrained 3-channel first-conv kernels are summed over
                 RGB, smp's rule (`encoders/_utils.patch_first_conv`, new_in_channels == 1:
                 `weight.sum(1, keepdim=True)`, no scaling; timm's adapt_input_conv does the same
                 for 1 channel). Local ImageNet files and 3-channel SSL exports get the same
                 rule on the file's tensor (encoder_weights.sum_rgb_first_conv).
  "colorize":    a learned colourisation module (class Colorizer), after Morra et al., "Bridging
                 the gap between natural and medical images through deep colorization"
                 (ICPR 2020): a small conv net trained from scratch, end to end, maps the x-ray to
                 3 channels in front of the pretrained encoder. Design here: conv3x3(1->16) + BN
                 + ReLU, two residual blocks (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU),
                 conv1x1(16->3); its output is ADDED to the gray input repeated to 3 channels, and
                 the conv1x1 starts at N(0, 1e-3^2) weights and zero bias, so the module starts at
                 ~"repeat" (the encoder sees familiar input on step 1) and learns a colour
                 mapping from there. Its parameters are new: they train at optim.head_lr and are
                 never frozen. (The paper's exact block count/width is not reproduced; this is
                 the same idea at a size fit for few-shot data.)

Input normalisation (inside the module, so evaluate/predict feed the usual [-1, 1] images):
x in [-1, 1] -> (x + 1) / 2 in [0, 1] -> (x - mean) / std per channel, with `input_mean` /
`input_std` buffers saved in the state dict. `model.input_norm`:
  "auto" (default): "imagenet" for init=imagenet; for init=pretrained (SSL) the export's
          encoder.json "input_norm" when it has one, else "none"; "none" for scratch.
  "imagenet": the encoder's ImageNet preprocessing parameters (ENCODER_PREPROCESSING below;
          timm's pretrained cfg for "tu-" encoders; a weights folder's smp-hub config.json
          mean/std when it has them). With in_channels = 1 the single channel uses the mean of
          the three means and of the three stds (the summed kernel then sees roughly what it saw
          for a gray RGB image).
  "none": mean = std = 0.5, i.e. the encoder sees the [-1, 1] images unchanged (scratch; SSL
          encoders pretrained on the project's [-1, 1] images).
  "unit": mean 0, std 1: the encoder sees the [0, 1] image, without mean / std (the released
          code's ImageNet and SSL baselines; "auto" for init=released_ssl).

Initialisation (`model.init`):
  "scratch":    smp's random init (encoder_weights=None).
  "imagenet":   `model.imagenet_weights` empty: smp's own download (encoder_weights="imagenet",
                needs internet / the Hugging Face cache). `model.imagenet_weights=PATH` (offline
                clusters): a local file holding the encoder's state dict, or a folder holding
                one (see load_encoder_file for the accepted layouts), loaded into the 3-channel
                encoder, then adapted to 1 channel for gray_adapter=in_channels.
  "pretrained": `model.pretrained_path` = an SSL export folder: encoder.safetensors (exactly
                `smp.Unet(encoder, in_channels=C, encoder_weights=None).encoder.state_dict()`)
                + encoder.json {"format": "ddpm_landmarks.ssl_encoder", "version": 1, "encoder":
                name, "in_channels": 1 | 3, "method": ...}; loaded strictly. Its encoder must
                equal the config's. A 3-channel export (ssl.in_channels=3, gray repeated in
                pretraining) loads with every gray_adapter: as it is for "repeat" / "colorize",
                first conv summed over RGB for "in_channels" (the ImageNet-file rule above); a
                1-channel export loads only with "in_channels".
  "regressor":  a saved smp regressor of another dataset: all but its segmentation head
                (models/transfer_init.py).
  "released_ssl": `model.pretrained_path` = one of the authors' SSL checkpoint files
                (ssl_pretraining/main.py: torch.save(backbone.state_dict()), a torchvision
                DenseNet161 with keys `features.*`, which are smp's densenet161 encoder's),
                read with torch.load(weights_only=True) by load_encoder_file like an ImageNet
                file (3-channel first conv; summed over RGB for gray_adapter=in_channels).

Learning rates (`param_groups` in models.regressor): "body" = the encoder at optim.lr; the
decoder, segmentation head and colouriser are new parameters at optim.head_lr (init=regressor,
models/transfer_init.py: only the segmentation head is new). The split is the
same for scratch (as for the DDPM scratch baseline, whose random body also runs at optim.lr): set
optim.lr = optim.head_lr for one learning rate.

Freezing (`model.freeze`): "encoder" = the smp encoder; "unet" = everything but the segmentation
head and the colouriser (a probe). Frozen parts are kept in eval mode even when the model is put in
train mode, so their BatchNorm running statistics stay frozen too (the DDPM U-Net has GroupNorm
only, where freezing parameters is enough).

save_regressor / load_regressor store the full state dict (normalisation buffers included) and
rebuild the architecture with encoder_weights=None: neither the ImageNet file nor the SSL export
is needed to load a fine-tuned model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from ddpm_landmarks.models.encoder_weights import (
    SSL_EXPORT,
    check_state,
    load_encoder_file,
    resolve_ssl_export,
    sum_rgb_first_conv,
)

SMP_ARCHS = ("smp_unet", "smp_unetplusplus")
GRAY_ADAPTERS = ("repeat", "in_channels", "colorize")
OUTPUT_STRIDE = 32
HEAD_INIT_STD = 1e-3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# smp 0.6 reads these from each encoder's Hugging Face config.json (a download); the values of
# its "imagenet" weights, kept here so that nothing is fetched. Prefix match, first hit wins;
# every other encoder uses the torchvision ImageNet statistics.
ENCODER_PREPROCESSING: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "dpn": ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3),
    "inceptionresnetv2": _HALF,
    "inceptionv4": _HALF,
    "xception": _HALF,
}



def encoder_in_channels(gray_adapter: str) -> int:
    if gray_adapter not in GRAY_ADAPTERS:
        raise ValueError(f"unknown gray_adapter {gray_adapter!r}; valid: "
                         f"{', '.join(GRAY_ADAPTERS)}")
    return 1 if gray_adapter == "in_channels" else 3


def imagenet_preprocessing(encoder: str, weights_dir: Optional[Path] = None
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) over RGB of the encoder's ImageNet weights (see ENCODER_PREPROCESSING)."""
    if weights_dir is not None and (weights_dir / "config.json").is_file():
        try:
            conf = json.loads((weights_dir / "config.json").read_text())
            if len(conf.get("mean", ())) == 3 and len(conf.get("std", ())) == 3:
                return tuple(map(float, conf["mean"])), tuple(map(float, conf["std"]))
        except (ValueError, TypeError):
            pass
    if encoder.startswith("tu-"):
        import timm
        try:
            pcfg = timm.models.get_pretrained_cfg(encoder[3:])
        except Exception:                                    # noqa: BLE001 - unknown tag
            pcfg = None
        if pcfg is not None and getattr(pcfg, "mean", None) and len(pcfg.mean) == 3:
            return tuple(pcfg.mean), tuple(pcfg.std)
        return IMAGENET_MEAN, IMAGENET_STD
    for prefix, stats in ENCODER_PREPROCESSING.items():
        if encoder.startswith(prefix):
            return stats
    return IMAGENET_MEAN, IMAGENET_STD


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class Colorizer(nn.Module):
    """Learned gray -> 3-channel mapping (module doc, "colorize"): (B, 1, H, W) in [-1, 1] ->
    (B, 3, H, W) = gray repeated + a learned residual that starts near zero."""

    def __init__(self, width: int = 16, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[_ResidualBlock(width) for _ in range(blocks)])
        self.out = nn.Conv2d(width, 3, kernel_size=1)
        nn.init.normal_(self.out.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) + self.out(self.blocks(self.stem(x)))


def check_encoder_name(name: str) -> None:
    from segmentation_models_pytorch.encoders import get_encoder_names
    if not name.startswith("tu-") and name not in get_encoder_names():
        close = [n for n in get_encoder_names() if n.split("_")[0].rstrip("0123456789")
                 == name.split("_")[0].rstrip("0123456789")][:8]
        raise ValueError(f"unknown smp encoder {name!r}" + (f"; similar: {', '.join(close)}"
                                                            if close else "") +
                         " (all: segmentation_models_pytorch.encoders.get_encoder_names(), or "
                         "'tu-<timm model>')")


def _smp_class(arch: str):
    import segmentation_models_pytorch as smp
    if arch == "smp_unet":
        return smp.Unet
    if arch == "smp_unetplusplus":
        return smp.UnetPlusPlus
    raise ValueError(f"unknown smp arch {arch!r}; valid: {', '.join(SMP_ARCHS)}")


class SmpRegressor(nn.Module):
    """smp encoder-decoder + gray adapter + input normalisation; see the module doc. Built at
    random init (encoder_weights=None) unless `encoder_weights` is given (smp's download)."""

    def __init__(self, cfg, num_landmarks: int, encoder_weights: Any = None):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if cfg.freeze not in ("none", "encoder", "unet"):
            raise ValueError(f"unknown freeze {cfg.freeze!r}; valid: none, encoder, unet")
        self.cfg = cfg
        self.num_landmarks = num_landmarks
        in_channels = encoder_in_channels(cfg.gray_adapter)
        self.in_channels = in_channels
        check_encoder_name(cfg.encoder)
        try:
            self.net = _smp_class(cfg.arch)(encoder_name=cfg.encoder,
                                            encoder_weights=encoder_weights,
                                            in_channels=in_channels, classes=num_landmarks,
                                            activation=None)
        except KeyError as err:                  # smp: "Wrong pretrained weights ..."
            raise ValueError(f"smp encoder {cfg.encoder!r}: {err}") from err
        last = self.net.segmentation_head[0]
        nn.init.normal_(last.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(last.bias)
        self.colorizer = Colorizer() if cfg.gray_adapter == "colorize" else None
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.5))

        if cfg.freeze == "encoder":
            self.net.encoder.requires_grad_(False)
        elif cfg.freeze == "unet":
            self.net.requires_grad_(False)
            self.net.segmentation_head.requires_grad_(True)

    # ------------------------------------------------------------------ parts
    @property
    def head(self) -> nn.Conv2d:
        """The K-channel output convolution (smp's segmentation head)."""
        return self.net.segmentation_head[0]

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def head_parameters(self):
        """New parameters (optim.head_lr): decoder, segmentation head, colouriser; only the
        segmentation head for init=regressor (the rest was trained on the source dataset)."""
        mods = [self.net.segmentation_head]
        if self.cfg.init != "regressor":
            mods.append(self.net.decoder)
            if self.colorizer is not None:
                mods.append(self.colorizer)
        for m in mods:
            yield from m.parameters()

    def frozen_modules(self) -> list[nn.Module]:
        if self.cfg.freeze == "encoder":
            return [self.net.encoder]
        if self.cfg.freeze == "unet":
            return [m for name, m in self.net.named_children() if name != "segmentation_head"]
        return []

    def train(self, mode: bool = True) -> "SmpRegressor":
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()                             # frozen BatchNorm statistics stay frozen
        return self

    def set_input_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-RGB-channel (mean, std) of the encoder's expected [0, 1] input; averaged to one
        channel when the encoder takes 1 channel."""
        mean_t = torch.tensor([float(v) for v in mean])
        std_t = torch.tensor([float(v) for v in std])
        if self.in_channels == 1:
            mean_t, std_t = mean_t.mean().reshape(1), std_t.mean().reshape(1)
        if mean_t.numel() != self.in_channels or std_t.numel() != self.in_channels:
            raise ValueError(f"input normalisation needs {self.in_channels} values, got "
                             f"mean {list(mean)} std {list(std)}")
        self.input_mean.copy_(mean_t.reshape(1, -1, 1, 1))
        self.input_std.copy_(std_t.reshape(1, -1, 1, 1))

    # ------------------------------------------------------------------ forward
    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [-1, 1] -> the normalised (B, C, H, W) the encoder sees."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        if self.colorizer is not None:
            x = self.colorizer(images)
        elif self.in_channels == 3:
            x = images.expand(-1, 3, -1, -1)
        else:
            x = images
        return ((x + 1) * 0.5 - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoder_input(images))


# ---------------------------------------------------------------------- SSL export
def load_ssl_export(model: SmpRegressor, path: str | Path) -> dict:
    """Strictly load an SSL export's encoder into `model` (module doc, init "pretrained");
    returns its encoder.json."""
    cfg = model.cfg
    folder, meta = resolve_ssl_export(path)
    if meta["encoder"] != cfg.encoder:
        raise ValueError(f"{folder / SSL_EXPORT.meta_file}: the SSL encoder is {meta['encoder']!r} but "
                         f"model.encoder={cfg.encoder!r}; set model.encoder={meta['encoder']}")
    exported = meta["in_channels"]
    if exported not in (1, 3) or isinstance(exported, bool):
        raise ValueError(f"{folder / SSL_EXPORT.meta_file}: in_channels must be 1 or 3, got {exported!r}")
    if exported == 1 and model.in_channels != 1:
        # A gray first conv cannot be split into RGB kernels without inventing weights.
        raise ValueError(f"{folder / SSL_EXPORT.meta_file}: the SSL encoder takes in_channels=1 but "
                         f"model.gray_adapter={cfg.gray_adapter!r} feeds it "
                         f"{model.in_channels}; set model.gray_adapter=in_channels (or pretrain "
                         f"with ssl.in_channels=3 for repeat / colorize)")
    weights = folder / SSL_EXPORT.weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (SSL export without encoder weights)")
    state = load_file(str(weights), device="cpu")
    if exported == 3 and model.in_channels == 1:
        # gray_adapter=in_channels: the ImageNet-file rule (first conv summed over RGB); a gray
        # image then gives what it gave repeated to 3 channels, as in pretraining.
        sum_rgb_first_conv(state, model.encoder.state_dict())
    check_state(model.encoder, state, f"SSL export {weights}",
                f"the smp encoder {cfg.encoder!r} (in_channels={model.in_channels})")
    result = nn.Module.load_state_dict(model.encoder, state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return meta


# ---------------------------------------------------------------------- build
def check_config(cfg, image_size: int) -> None:
    if cfg.arch not in SMP_ARCHS:
        raise ValueError(f"unknown smp arch {cfg.arch!r}; valid: {', '.join(SMP_ARCHS)}")
    if cfg.init not in ("scratch", "imagenet", "pretrained", "regressor", "released_ssl"):
        raise ValueError(f"unknown init {cfg.init!r} for arch {cfg.arch}; valid: scratch, "
                         f"imagenet, pretrained, regressor, released_ssl")
    encoder_in_channels(cfg.gray_adapter)
    if cfg.noise_input:
        raise ValueError(f"noise_input is a DDPM option; not available for arch {cfg.arch}")
    if cfg.head != "conv1x1":
        raise ValueError(f"model.head={cfg.head!r}: arch {cfg.arch} has smp's segmentation head "
                         f"(leave model.head at conv1x1)")
    if cfg.input_norm not in ("auto", "imagenet", "none", "unit"):
        raise ValueError(f"unknown input_norm {cfg.input_norm!r}; valid: auto, imagenet, none, "
                         f"unit")
    if not cfg.encoder:
        raise ValueError(f"arch {cfg.arch} needs model.encoder (e.g. resnet18)")
    if image_size <= 0 or image_size % OUTPUT_STRIDE:
        raise ValueError(f"image_size {image_size} must be a positive multiple of "
                         f"{OUTPUT_STRIDE} for arch {cfg.arch} (5 stride-2 encoder stages)")
    if cfg.init == "pretrained" and not cfg.pretrained_path:
        raise ValueError("init='pretrained' needs pretrained_path (an SSL export/ folder)")
    if cfg.init == "released_ssl" and not cfg.pretrained_path:
        raise ValueError("init='released_ssl' needs pretrained_path (the authors' SSL "
                         "checkpoint file, e.g. .../dino/densenet161/model_epoch*_iter10000.pth)")


def build_smp_regressor(cfg, num_landmarks: int, image_size: int) -> SmpRegressor:
    """The baseline at cfg.init (module doc); errors are ValueError / FileNotFoundError with
    the offending file and keys named."""
    check_config(cfg, image_size)
    norm = cfg.input_norm
    weights_dir = None
    if cfg.init == "imagenet" and not cfg.imagenet_weights:
        check_encoder_name(cfg.encoder)                  # a typo is not a download error
        online = True if cfg.encoder.startswith("tu-") else "imagenet"
        try:
            model = SmpRegressor(cfg, num_landmarks, encoder_weights=online)
        except ValueError:
            raise
        except Exception as err:                 # noqa: BLE001 - hub / network errors, any type
            raise FileNotFoundError(
                f"could not get the ImageNet weights of {cfg.encoder!r} through smp "
                f"({type(err).__name__}: {err}); offline, download them elsewhere and set "
                f"model.imagenet_weights=PATH (a state-dict file or the smp-hub folder)") from err
    else:
        model = SmpRegressor(cfg, num_landmarks)
        if cfg.init == "imagenet":
            file = load_encoder_file(model.encoder, cfg.imagenet_weights, cfg.encoder)
            weights_dir = file.parent
        elif cfg.init == "released_ssl":
            load_encoder_file(model.encoder, cfg.pretrained_path, cfg.encoder,
                              what="model.pretrained_path (released SSL checkpoint)")
            norm = "unit" if norm == "auto" else norm
        elif cfg.init == "pretrained":
            meta = load_ssl_export(model, cfg.pretrained_path)
            if norm == "auto":
                norm = str(meta.get("input_norm", "none"))
                if norm not in ("imagenet", "none", "unit"):
                    raise ValueError(f"{cfg.pretrained_path}: unknown input_norm {norm!r} in "
                                     f"{SSL_EXPORT.meta_file} (imagenet | none)")
    if norm == "auto":
        norm = "imagenet" if cfg.init == "imagenet" else "none"
    if norm == "imagenet":
        model.set_input_norm(*imagenet_preprocessing(cfg.encoder, weights_dir))
    elif norm == "unit":
        model.set_input_norm((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return model
