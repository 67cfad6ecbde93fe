"""A 3-channel SSL export (ssl.in_channels=3, the gray image repeated in pretraining) loads with
every gray adapter, so the repeat / in_channels / colorize comparison runs on an SSL encoder
where no ImageNet weights can be downloaded. For gray_adapter=in_channels its first conv is
summed over RGB (the ImageNet-file rule); summing kernels over three identical channels is exact,
so that model computes what the repeat model computes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
from ddpm_landmarks.models.registry import build_regressor

K = 3

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def ssl_export(folder, in_channels: int):
    """A real export of SimCLRMethod (resnet18) with non-default BatchNorm statistics."""
    cfg = PretrainConfig(method="simclr")
    cfg.data.image_size = 32
    cfg.ssl.in_channels = in_channels
    cfg.ssl.hidden_dim = 32
    torch.manual_seed(in_channels)
    method = PRETRAINING_METHODS["simclr"](cfg)
    with torch.no_grad():
        for m in method.model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    method.export(method.model, folder, {"method": "simclr"})
    return folder


def smp_model(export, gray_adapter: str, seed: int = 0):
    cfg = RegressorConfig(arch="smp_unet", encoder="resnet18", init="pretrained",
                          pretrained_path=str(export), gray_adapter=gray_adapter,
                          input_norm="none")
    torch.manual_seed(seed)
    return build_regressor(cfg, K, 64).eval()


def test_rgb_export_loads_with_every_adapter_and_in_channels_equals_repeat(tmp_path):
    export = ssl_export(tmp_path / "export", in_channels=3)
    assert json.loads((export / "encoder.json").read_text())["in_channels"] == 3
    state = load_file(str(export / "encoder.safetensors"))

    repeat = smp_model(export, "repeat")
    gray = smp_model(export, "in_channels")
    colorize = smp_model(export, "colorize")
    for model in (repeat, colorize):                          # the export as it is
        got = model.encoder.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
    got = gray.encoder.state_dict()
    assert got.keys() == state.keys()                          # nothing missing or unexpected
    assert got["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(got["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True),
                               rtol=0, atol=0)
    assert all(torch.equal(got[k], state[k]) for k in state if k != "conv1.weight")

    # Same decoder and head in both (the builds draw them differently), a head of weight 1 so
    # that the heatmaps are not ~0 (the default head starts near zero). In float64, so that the
    # only difference left is the float32 rounding of the summed kernel (~1e-7 relative).
    with torch.no_grad():
        repeat.head.weight.normal_(std=1.0)
    gray.net.decoder.load_state_dict(repeat.net.decoder.state_dict())
    gray.net.segmentation_head.load_state_dict(repeat.net.segmentation_head.state_dict())
    gray, repeat = gray.double(), repeat.double()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray.encoder_input(x), x)                  # input_norm none
        torch.testing.assert_close(repeat.encoder_input(x), x.expand(-1, 3, -1, -1))
        features = zip(gray.encoder(gray.encoder_input(x))[1:],      # [0] is the input itself
                       repeat.encoder(repeat.encoder_input(x))[1:])
        for a, b in features:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        out_gray, out_repeat = gray(x), repeat(x)
    scale = out_repeat.abs().max().item()
    assert scale > 1.0                                         # a real comparison, not zeros
    torch.testing.assert_close(out_gray, out_repeat, rtol=1e-6, atol=1e-6 * scale)

def test_gray_export_loads_only_into_in_channels(tmp_path):
    export = ssl_export(tmp_path / "export", in_channels=1)
    state = load_file(str(export / "encoder.safetensors"))
    got = smp_model(export, "in_channels").encoder.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    for adapter in ("repeat", "colorize"):
        with pytest.raises(ValueError, match=rf"encoder.json: the SSL encoder takes in_channels=1 "
                                             rf"but model.gray_adapter='{adapter}' feeds it 3; "
                                             rf"set model.gray_adapter=in_channels"):
            smp_model(export, adapter)


def test_export_with_other_channel_count_is_refused(tmp_path):
    export = ssl_export(tmp_path / "export", in_channels=3)
    meta = json.loads((export / "encoder.json").read_text())
    (export / "encoder.json").write_text(json.dumps({**meta, "in_channels": 2}))
    with pytest.raises(ValueError, match="encoder.json: in_channels must be 1 or 3, got 2"):
        smp_model(export, "in_channels")
