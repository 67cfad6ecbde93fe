"""The authors' checkpoints as inits (models/released_unet.py, released_weights.py, the smp
released_ssl path): the released U-Net's exact layout and arithmetic, files saved in the
released layouts loaded through model.init=released_ddpm / released_ssl, code payloads refused.

The released files cannot be downloaded here: each test builds a randomly initialised model of
the same class, saves it the way the released code does, and loads it through our path."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ddpm_landmarks.config.finetune import RegressorConfig, ReleasedUnetConfig
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.released_unet import ReleasedUnet
from ddpm_landmarks.models.saved_regressor import load_regressor, save_regressor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KEYS_FILE = Path(__file__).parent / "data" / "released_unet_keys.txt"
TINY = ReleasedUnetConfig(dim=16, dim_mults=(1, 2), resnet_block_groups=4, att_heads=2,
                          att_dim_head=8)
SIZE, K = 16, 3


def test_full_size_layout_is_the_released_state_dict():
    """Key, shape and order of all 293 tensors (dumped from the released nn_blocks.py Unet),
    558,548,225 parameters; built on the meta device (no memory)."""
    expected = [line.split(" ", 1) for line in KEYS_FILE.read_text().splitlines() if line]
    with torch.device("meta"):
        unet = ReleasedUnet(ReleasedUnetConfig())
    ours = [(k, str(tuple(v.shape))) for k, v in unet.state_dict().items()]
    assert ours == [(k, s) for k, s in expected]
    assert sum(p.numel() for p in unet.parameters()) == 558_548_225


def _fill(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(0.2 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i)
                    .reshape(p.shape))


def test_outputs_equal_the_released_code():
    """Values the released code (HEAD 22d67ad nn_blocks.Unet, dim 16, mults (1, 2), 4 groups,
    2 heads of 8) computes for these deterministic weights and images, with and without t."""
    unet = ReleasedUnet(TINY).eval()
    _fill(unet)
    y, x = torch.meshgrid(torch.linspace(0, 1, 16, dtype=torch.float64),
                          torch.linspace(0, 1, 16, dtype=torch.float64), indexing="ij")
    images = torch.stack([x * y, (1 - x) * y])[:, None].float()
    with torch.no_grad():
        a, b = unet(images, torch.tensor([3, 250])), unet(images)
    for out, ref in ((a, (-88.1339340209961, -0.17047639191150665, -0.17226359248161316)),
                     (b, (-86.30254364013672, -0.17521455883979797, -0.1682414412498474))):
        got = (out.sum().item(), out[0, 0, 5, 7].item(), out[1, 0, 12, 2].item())
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def _released_model(seed: int = 0) -> ReleasedUnet:
    torch.manual_seed(seed)
    return ReleasedUnet(TINY)


def _cfg(path: Path | str = "", **kw) -> RegressorConfig:
    return RegressorConfig(arch="released_unet", init="released_ddpm", pretrained_path=str(path),
                           released=TINY, **kw)


@pytest.mark.parametrize("layout", ["ema", "online"])
def test_released_ddpm_checkpoint_loads_and_fine_tunes(tmp_path, layout):
    """training_functions.py's save_ema_model / save_model dicts: body loaded strictly, our
    head in place of final_conv, input mapped to [0, 1], time dropped or fixed."""
    unet = _released_model()
    file = tmp_path / "ema_model_epoch800_step6000.pt"
    content = {"epoch": 800, "n_iter": 6000, "model_state_dict": unet.state_dict()}
    if layout == "online":
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        unet(torch.rand(1, 1, SIZE, SIZE), torch.tensor([5])).mean().backward()
        opt.step()
        content.update(optimizer_state_dict=opt.state_dict(), loss=torch.tensor(0.1))
    torch.save(content, file)
    model = build_regressor(_cfg(file, timestep_mode="drop"), K, SIZE)
    assert model.cfg.input_range == "unit" and model.unet.time_mlp is None
    ref = content["model_state_dict"]
    body = {k: v for k, v in model.unet.state_dict().items() if not k.startswith("final_conv.")}
    assert set(body) == {k for k in ref if not k.startswith(("final_conv.", "time_mlp."))
                         and ".mlp." not in k}          # FiLM projections gone with the time
    assert all(torch.equal(v, ref[k]) for k, v in body.items())
    assert model.head.out_channels == K and model.head.weight.abs().max() < 0.01
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    unet.final_conv = model.unet.final_conv             # the same network with our head
    unet.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), unet((x + 1) / 2), atol=1e-6)     # time None, [0, 1]
        fixed = build_regressor(_cfg(file, timestep_mode="fixed", timestep=7), K, SIZE).eval()
        fixed.unet.final_conv = model.unet.final_conv
        assert torch.allclose(fixed(x), unet((x + 1) / 2, torch.full((2,), 7)), atol=1e-6)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """torch.load(weights_only=True): a pickle whose unpickling calls a function (here: create
    a file) is an error, and the function never runs; for the DDPM and the SSL path."""
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    file = tmp_path / "ema_model.pt"
    torch.save({"model_state_dict": _released_model().state_dict(), "extra": Payload()}, file)
    with pytest.raises(ValueError, match="refused it.*could run code"):
        build_regressor(_cfg(file), K, SIZE)
    ssl = RegressorConfig(arch="smp_unet", init="released_ssl", encoder="resnet18",
                          pretrained_path=str(file))
    with pytest.raises(ValueError, match="cannot read weights"):
        build_regressor(ssl, K, 32)
    assert not marker.exists()


def test_wrong_checkpoint_names_the_problem(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="not a released DDPM checkpoint"):
        build_regressor(_cfg(tmp_path / "a.pt"), K, SIZE)
    bigger = ReleasedUnet(dataclasses.replace(TINY, dim=32))
    torch.save({"model_state_dict": bigger.state_dict()}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="model.released.*shape mismatches: downs.0.0.block1.norm.bias"):
        build_regressor(_cfg(tmp_path / "b.pt"), K, SIZE)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_regressor(_cfg(tmp_path / "missing.pt"), K, SIZE)
    with pytest.raises(ValueError, match="needs model.arch=released_unet"):
        build_regressor(dataclasses.replace(_cfg(tmp_path / "a.pt"), arch="ddpm_unet"), K, SIZE)


def test_saved_released_regressor_round_trips(tmp_path):
    torch.save({"model_state_dict": _released_model().state_dict()}, tmp_path / "ema.pt")
    model = build_regressor(_cfg(tmp_path / "ema.pt", head="small", freeze="encoder"), K, SIZE)
    assert not any(p.requires_grad for p in model.unet.downs.parameters())
    assert all(p.requires_grad for p in model.unet.ups.parameters())
    save_regressor(model, tmp_path / "saved")
    again = load_regressor(tmp_path / "saved")
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    assert again.cfg.released == TINY and again.cfg.input_range == "unit"


def test_scratch_is_the_released_network_at_random_init():
    cfg = dataclasses.replace(_cfg(), init="scratch")
    model = build_regressor(cfg, K, SIZE)
    assert model(torch.zeros(1, 1, SIZE, SIZE)).shape == (1, K, SIZE, SIZE)
    with pytest.raises(ValueError, match="multiple of 2"):
        build_regressor(cfg, K, 15)


def test_released_ssl_backbone_file_loads_into_the_smp_encoder(tmp_path):
    """ssl_pretraining/main.py saves torchvision densenet161(classifier=Identity).state_dict()
    (`features.*`): it loads strictly into smp's densenet161 encoder, input [0, 1] unnormalised."""
    import torchvision
    torch.manual_seed(0)
    backbone = torchvision.models.densenet161(weights=None)
    backbone.classifier = torch.nn.Identity()
    file = tmp_path / "model_epoch50_iter10000.pth"
    torch.save(backbone.state_dict(), file)
    cfg = RegressorConfig(arch="smp_unet", init="released_ssl", encoder="densenet161",
                          gray_adapter="repeat", pretrained_path=str(file))
    model = build_regressor(cfg, K, 32)
    state = model.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())
    assert model.input_mean.flatten().tolist() == [0.0] * 3
    assert model.input_std.flatten().tolist() == [1.0] * 3
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert torch.allclose(model.encoder_input(x), ((x + 1) / 2).expand(-1, 3, -1, -1))
