"""smp encoders and their weight files: ImageNet checkpoints given by path (offline clusters)
and SSL exports.

    encoder = build_smp_encoder("resnet18", in_channels=1)                     # random init
    file = load_encoder_file(model.encoder, "weights/resnet18.pth", "resnet18")   # in place
    encoder, meta = load_ssl_encoder("runs/simclr_isbi/export")

A wrong file is an error naming the file and the first missing / unexpected / mis-shaped keys,
never a silent partial load. The SSL export contract (written by methods.ssl_base):
encoder.safetensors = `smp.Unet(name, in_channels=C, encoder_weights=None).encoder.state_dict()`
and encoder.json = {"format": "ddpm_landmarks.ssl_encoder", "version": 1, "encoder": name,
"in_channels": C, "method": ...} (models/artifacts.py, kind "ssl_encoder"). A 3-channel first conv (ImageNet file, or an SSL export with C = 3) loaded into
a 1-channel encoder is summed over RGB (sum_rgb_first_conv, smp's rule).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ddpm_landmarks.models.artifacts import FORMATS, read_meta, weights_folder

SSL_EXPORT = FORMATS["ssl_encoder"]
# Files a weights folder is searched for, in this order; else its only weight file.
WEIGHT_FILE_NAMES = ("model.safetensors", "encoder.safetensors", "pytorch_model.bin", "model.pth",
                     "model.pt")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Classifier layers of ImageNet checkpoints that smp encoders do not have (smp's own loaders pop
# them too): dropped when the encoder has no such key.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "last_linear.", "_fc.", "head.", "model.fc.",
                        "model.classifier.", "model.head.", "model.last_linear.")
# torchvision's old DenseNet names ("denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"),
# the renaming of smp's DenseNetEncoder.load_state_dict.
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")

def resolve_weights_file(path: str | Path, what: str = "model.imagenet_weights") -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r}: no such file or folder")
    if p.is_file():
        return p
    for name in WEIGHT_FILE_NAMES:
        if (p / name).is_file():
            return p / name
    found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"{what} {str(p)!r}: a folder must hold one of {', '.join(WEIGHT_FILE_NAMES)} or exactly "
        f"one *{'/*'.join(WEIGHT_SUFFIXES)} file; found {[f.name for f in found] or 'none'}")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights_only), unwrapping the usual
    checkpoint containers ({"state_dict": ...}, {"model": ...}, {"encoder": ...})."""
    try:
        if file.name.endswith(".safetensors"):
            obj: Any = load_file(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:                                     # noqa: BLE001
        raise ValueError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from err
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "encoder", "module")
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: not a state dict (a {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{file}: holds no tensors")
    return state


def _align_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Key layout of a checkpoint -> the encoder's: the best of no change, stripping a
    "module." / "encoder." / "net.encoder." / "model.encoder." prefix (DDP, a whole smp model,
    a saved regressor), or adding "model." (timm "tu-" encoders wrap the timm model)."""
    candidates = [state]
    for prefix in ("module.", "encoder.", "net.encoder.", "model.encoder.", "module.encoder."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            candidates.append(sub)
    candidates.append({f"model.{k}": v for k, v in state.items()})
    best = max(candidates, key=lambda s: len(expected & s.keys()))
    # DenseNet: torchvision's old layer names, as smp's DenseNetEncoder.load_state_dict renames.
    out = {}
    for k, v in best.items():
        m = _DENSENET_KEY.match(k)
        out[m.group(1) + m.group(2) if m and k not in expected else k] = v
    return {k: v for k, v in out.items()
            if k in expected or not k.startswith(_CLASSIFIER_PREFIXES)}


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                what: str) -> None:
    """Strict key / shape check with the first offending keys named (ValueError)."""
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
              for k in sorted(expected.keys() & state.keys())
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if shapes:
            more = f" ... ({len(shapes)} in all)" if len(shapes) > 5 else ""
            parts.append(f"shape mismatches: {'; '.join(shapes[:5])}{more}")
        raise ValueError(f"{source} does not match {what}: " + "; ".join(parts))


def sum_rgb_first_conv(state: dict[str, torch.Tensor],
                       expected: dict[str, torch.Tensor]) -> list[str]:
    """3-channel conv kernels of `state` where the encoder (`expected`, its state dict) has a
    1-channel conv of otherwise equal shape are summed over RGB, in place: smp's
    patch_first_conv rule for new_in_channels == 1 (`weight.sum(1, keepdim=True)`, no scaling),
    so a gray image x gives the same first-conv output as RGB = (x, x, x) did. Used for ImageNet
    files and 3-channel SSL exports alike. Returns the keys changed (the first conv)."""
    changed = []
    for k, v in list(state.items()):
        target = expected.get(k)
        if target is not None and v.ndim == 4 and target.ndim == 4 and v.shape[1] == 3 \
                and target.shape[1] == 1 and v.shape[0] == target.shape[0] \
                and v.shape[2:] == target.shape[2:]:
            state[k] = v.sum(1, keepdim=True)
            changed.append(k)
    return changed


def load_encoder_file(encoder: nn.Module, path: str | Path, encoder_name: str,
                      what: str = "model.imagenet_weights") -> Path:
    """Load ImageNet (or any) weights of `encoder_name` from a local file into `encoder`.

    Accepted: a file, or a folder holding model.safetensors (the smp-hub layout that smp itself
    downloads, e.g. a copy of the Hugging Face snapshot of smp-hub/resnet50.imagenet),
    encoder.safetensors, pytorch_model.bin, model.pth / model.pt, or a single
    *.safetensors/.pth/.pt/.bin/.ckpt file. The file holds a state dict (safetensors or a torch
    pickle readable with weights_only=True), bare or under "state_dict"/"model"/"encoder", with
    the encoder's keys: smp's encoder state dict, the torchvision / timm classification model's
    (classifier "fc."/"classifier."/"last_linear."/"head." keys are dropped, torchvision's
    old DenseNet names renamed, BatchNorm num_batches_tracked counters that old checkpoints lack
    filled in), or a whole smp model's ("encoder." prefix); a "module." prefix is stripped. A
    3-channel first conv loaded into a 1-channel encoder is summed over RGB (smp's
    patch_first_conv rule). Anything else missing, unexpected or of another shape is a
    ValueError naming the file and the first such keys. Returns the file read."""
    file = resolve_weights_file(path, what)
    state = _align_keys(read_state_dict(file), set(encoder.state_dict()))
    expected = encoder.state_dict()
    sum_rgb_first_conv(state, expected)
    for k in expected.keys() - state.keys():
        if k.endswith(".num_batches_tracked"):          # older checkpoints predate the counter
            state[k] = expected[k].clone()
    check_state(encoder, state, f"{what} file {file}", f"the smp encoder {encoder_name!r}")
    nn.Module.load_state_dict(encoder, state, strict=True)
    return file


def build_smp_encoder(name: str, in_channels: int) -> nn.Module:
    """The smp encoder `name` at random init (same keys as smp.Unet(name, ...).encoder)."""
    from segmentation_models_pytorch.encoders import get_encoder
    return get_encoder(name, in_channels=in_channels, depth=5, weights=None)


def smp_encoder_channels(name: str, in_channels: int = 1) -> int:
    """Channels of the deepest feature map of encoder `name` (built on the meta device)."""
    with torch.device("meta"):
        return int(build_smp_encoder(name, in_channels).out_channels[-1])


def resolve_ssl_export(path: str | Path) -> tuple[Path, dict]:
    """(folder, encoder.json) of an SSL export given as the export folder or its pretraining run
    folder; an error saying what the path is otherwise."""
    folder = weights_folder(path, "ssl_encoder", "export", "model.pretrained_path")
    return folder, read_meta(folder, "ssl_encoder", "model.pretrained_path")


def load_ssl_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """(smp encoder with the exported weights, encoder.json) of an SSL export folder."""
    folder, meta = resolve_ssl_export(path)
    encoder = build_smp_encoder(meta["encoder"], int(meta["in_channels"]))
    # nn.Module.load_state_dict: smp encoders override it (silently dropping "fc." keys).
    nn.Module.load_state_dict(encoder, load_file(str(folder / SSL_EXPORT.weights_file)),
                              strict=True)
    return encoder, meta
