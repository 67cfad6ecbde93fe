"""segmentation-models-pytorch baselines (models/smp_regressor.py) through the same fine-tuning,
evaluation and prediction code as the DDPM regressor: encoders build and train, ImageNet weights
from a local file (smp's first-conv rule for 1 channel), the SSL export contract, the learned
colouriser, freezing, and a short synthetic run evaluated, predicted and reloaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.finetune import FinetuneConfig, RegressorConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.finetune import check_resumed_landmarks, finetune
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.models.saved_regressor import load_regressor, save_regressor
from ddpm_landmarks.models.smp_regressor import IMAGENET_MEAN, IMAGENET_STD, Colorizer
from ddpm_landmarks.training.checkpoint import checkpoint_dir, read_checkpoint
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune" / "synthetic.yaml"
BASELINES = ROOT / "configs" / "finetune" / "baselines"
K = 3


def smp_cfg(**kw) -> RegressorConfig:
    return RegressorConfig(**{"arch": "smp_unet", "encoder": "resnet18", "init": "scratch", **kw})


def images(b=2, size=64, seed=1) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_encoder_state(name="resnet18", in_channels=3, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    enc = smp.Unet(name, encoder_weights=None, in_channels=in_channels).encoder
    # Non-default BatchNorm statistics, so that "equal to the file" is a real check.
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in enc.state_dict().items()}


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> tuple[Path, dict]:
    """A stand-in for ImageNet weights: a seeded random resnet18 encoder, torch.save'd."""
    state = random_encoder_state("resnet18", 3, seed=0)
    path = tmp_path_factory.mktemp("imagenet") / "resnet18_imagenet.pth"
    torch.save(state, path)
    return path, state


def write_ssl_export(folder: Path, state: dict, encoder="resnet18", in_channels=3,
                     **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "encoder.safetensors"))
    (folder / "encoder.json").write_text(json.dumps({
        "format": "ddpm_landmarks.ssl_encoder", "version": 1, "encoder": encoder,
        "in_channels": in_channels, "method": "simclr", **meta}))
    return folder


def assert_encoder_equals(model, state):
    got = model.encoder.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------------------------
# Encoders and decoders build, run forward and backward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,encoder", [
    ("smp_unet", "resnet18"), ("smp_unet", "resnet50"), ("smp_unet", "densenet161"),
    ("smp_unet", "vgg19"), ("smp_unet", "resnext50_32x4d"), ("smp_unetplusplus", "resnet18")])
def test_encoder_builds_forward_backward(arch, encoder):
    torch.manual_seed(0)
    model = build_regressor(smp_cfg(arch=arch, encoder=encoder), K, 64)
    b = 2 if encoder == "resnet18" else 1
    out = model(images(b))
    assert out.shape == (b, K, 64, 64) and torch.isfinite(out).all()
    assert out.abs().max() < 0.5                         # near-zero head init, as the DDPM head
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.out_channels == K and model.num_landmarks == K and model.cfg.arch == arch


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_regressor(smp_cfg(), K, 48)
    with pytest.raises(ValueError, match="noise_input"):
        build_regressor(smp_cfg(noise_input=True), K, 64)
    with pytest.raises(ValueError, match="unknown smp encoder 'resnet19'"):
        build_regressor(smp_cfg(encoder="resnet19"), K, 64)
    with pytest.raises(ValueError, match="smp_unet"):
        build_regressor(RegressorConfig(init="imagenet"), K, 64)      # ddpm_unet has no ImageNet
    for f in sorted(BASELINES.glob("*.yaml")):                        # every baseline config loads
        cfg = load_config(f, cls=FinetuneConfig)
        assert cfg.model.arch in ("smp_unet", "smp_unetplusplus"), f
        assert "ddpm-landmarks finetune configs/finetune/baselines/" + f.name in f.read_text()


# ----------------------------------------------------------------------------------------------
# ImageNet weights from a local file
# ----------------------------------------------------------------------------------------------

def test_imagenet_file_repeat_equals_file_and_in_channels_follows_smp(imagenet_file, tmp_path):
    path, state = imagenet_file
    model = build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(path)), K, 64)
    assert_encoder_equals(model, state)
    assert torch.allclose(model.input_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.input_std.flatten(), torch.tensor(IMAGENET_STD))
    # The module normalises: [-1, 1] -> [0, 1] -> ImageNet statistics, gray repeated.
    x = images(1)
    ref = ((x.repeat(1, 3, 1, 1) + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.encoder_input(x), ref)

    gray = build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(path),
                                   gray_adapter="in_channels"), K, 64)
    conv = gray.encoder.conv1.weight
    assert conv.shape[1] == 1
    torch.testing.assert_close(conv, state["conv1.weight"].sum(1, keepdim=True), rtol=0, atol=0)
    # ... exactly smp's own adaptation: a 3-channel encoder with the file, patch_first_conv'd.
    enc = smp.Unet("resnet18", encoder_weights=None).encoder
    torch.nn.Module.load_state_dict(enc, state)
    enc.set_in_channels(1, pretrained=True)
    for k, v in enc.state_dict().items():
        assert torch.equal(gray.encoder.state_dict()[k], v), k
    assert gray.input_mean.shape == (1, 1, 1, 1)

    # Other layouts: a folder with one file; torchvision's classifier checkpoint (fc dropped);
    # a whole smp model's state dict ("encoder." prefix) under "state_dict".
    (tmp_path / "hub").mkdir()
    shutil.copy(path, tmp_path / "hub" / "weights.pth")
    tv = {**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(tv, tmp_path / "tv.pth")
    whole = {**{f"encoder.{k}": v for k, v in state.items()}, "decoder.x": torch.zeros(1)}
    save_file(whole, str(tmp_path / "whole.safetensors"))
    torch.save({"state_dict": whole, "epoch": 3}, tmp_path / "ckpt.pth")
    for p in ("hub", "tv.pth", "whole.safetensors", "ckpt.pth"):
        m = build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(tmp_path / p)), K, 64)
        assert_encoder_equals(m, state)


def test_imagenet_file_errors(imagenet_file, tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(missing)), K, 64)
    other = tmp_path / "resnet50.pth"
    torch.save(smp.Unet("resnet50", encoder_weights=None).encoder.state_dict(), other)
    with pytest.raises(ValueError) as err:
        build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(other)), K, 64)
    msg = str(err.value)
    assert str(other) in msg and "'resnet18'" in msg
    assert "unexpected keys: layer1.0.bn3.bias" in msg and "shape mismatches: layer1.0.conv1" in msg
    # Through the fine-tuning script: a ConfigError naming the file.
    cfg = load_config(FINETUNE, ["model.arch=smp_unet", "model.init=imagenet",
                                 f"model.imagenet_weights={missing}", "logger.kind=none",
                                 f"run.output_dir={tmp_path}", "train.num_workers=0",
                                 f"data.root={tmp_path / 'syn'}", "data.synthetic_num_images=12",
                                 "data.synthetic_image_size=64", "fewshot.budget=4",
                                 "fewshot.val_count=2"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="nowhere"):
        finetune(cfg)


# ----------------------------------------------------------------------------------------------
# SSL export contract
# ----------------------------------------------------------------------------------------------

def test_ssl_export_loads_strictly_and_checks_name_and_channels(tmp_path):
    state = random_encoder_state("resnet18", 3, seed=3)
    export = write_ssl_export(tmp_path / "ssl" / "export", state)
    cfg = smp_cfg(init="pretrained", pretrained_path=str(export))
    torch.manual_seed(0)
    model = build_regressor(cfg, K, 64)
    assert_encoder_equals(model, state)
    torch.manual_seed(0)
    scratch = build_regressor(smp_cfg(), K, 64)
    assert not torch.equal(scratch.encoder.conv1.weight, state["conv1.weight"])
    # input_norm auto: the [-1, 1] images unchanged, unless the export asks for ImageNet's.
    x = images(1)
    torch.testing.assert_close(model.encoder_input(x), x.expand(-1, 3, -1, -1))
    # The run folder works too (its export/ is found).
    assert_encoder_equals(build_regressor(smp_cfg(init="pretrained",
                                                  pretrained_path=str(tmp_path / "ssl")), K, 64),
                          state)

    gray = random_encoder_state("resnet18", 1, seed=4)
    g_export = write_ssl_export(tmp_path / "gray", gray, in_channels=1, input_norm="imagenet")
    g_model = build_regressor(smp_cfg(init="pretrained", pretrained_path=str(g_export),
                                      gray_adapter="in_channels"), K, 64)
    assert_encoder_equals(g_model, gray)
    assert torch.allclose(g_model.input_mean, torch.tensor(IMAGENET_MEAN).mean())

    with pytest.raises(ValueError, match="SSL encoder is 'resnet18' but model.encoder='resnet34'"):
        build_regressor(smp_cfg(encoder="resnet34", init="pretrained",
                                pretrained_path=str(export)), K, 64)
    with pytest.raises(ValueError, match="in_channels=1 .* set model.gray_adapter=in_channels"):
        build_regressor(smp_cfg(init="pretrained", pretrained_path=str(g_export)), K, 64)
    bad = write_ssl_export(tmp_path / "bad", {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        build_regressor(smp_cfg(init="pretrained", pretrained_path=str(bad)), K, 64)
    partial = write_ssl_export(tmp_path / "partial", {k: v for k, v in state.items()
                                                      if k != "bn1.weight"})
    with pytest.raises(ValueError, match="missing keys: bn1.weight"):
        build_regressor(smp_cfg(init="pretrained", pretrained_path=str(partial)), K, 64)
    with pytest.raises(FileNotFoundError, match="not an SSL encoder export"):
        build_regressor(smp_cfg(init="pretrained", pretrained_path=str(tmp_path)), K, 64)


# ----------------------------------------------------------------------------------------------
# Freezing and the colouriser
# ----------------------------------------------------------------------------------------------

def test_freeze_encoder_keeps_weights_and_bn_statistics(imagenet_file):
    path, state = imagenet_file
    model = build_regressor(smp_cfg(init="imagenet", imagenet_weights=str(path),
                                    freeze="encoder"), K, 64)
    model.train()
    assert not model.encoder.training and model.net.decoder.training
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-2, 1e-4))
    before = {k: v.clone() for k, v in model.net.decoder.state_dict().items()}
    for _ in range(2):
        opt.zero_grad()
        (model(images()) - 1).pow(2).mean().backward()
        opt.step()
    assert_encoder_equals(model, state)                  # weights AND running statistics
    assert any(not torch.equal(before[k], v) for k, v in model.net.decoder.state_dict().items())

    probe = build_regressor(smp_cfg(freeze="unet", gray_adapter="colorize"), K, 64)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in probe.named_parameters()
                 if p.requires_grad}
    assert trainable == {"net.segmentation_head", "colorizer.stem", "colorizer.blocks",
                         "colorizer.out"}
    assert {g["name"] for g in param_groups(probe, 1e-4, 1e-3, 0.0)} == {"head", "head_no_decay"}


def test_colorizer_starts_at_repeat_and_trains_in_the_head_group(imagenet_file, tmp_path):
    col = Colorizer()
    x = images(2, 32)
    y = col(x)
    assert y.shape == (2, 3, 32, 32)
    assert (y - x.repeat(1, 3, 1, 1)).abs().max() < 0.05                # starts near "repeat"

    path, state = imagenet_file
    cfg = load_config(FINETUNE, [
        "model.arch=smp_unet", "model.encoder=resnet18", "model.init=imagenet",
        f"model.imagenet_weights={path}", "model.gray_adapter=colorize", "optim.lr=1e-4",
        "optim.head_lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        f"data.root={tmp_path / 'syn'}", "data.synthetic_num_images=12",
        "data.synthetic_image_size=64", "data.image_size=32", "fewshot.budget=4",
        "fewshot.val_policy=none", "train.batch_size=2", "train.max_steps=3",
        "train.eval_every=0", "train.checkpoint_every=0", "train.num_workers=0",
        "logger.kind=none", f"run.output_dir={tmp_path}", "run.name=col"], cls=FinetuneConfig)
    set_seed(cfg.train.seed)                              # what finetune() builds at step 0
    start = build_regressor(cfg.model, 8, 32)
    set_seed(cfg.train.seed)
    same = build_regressor(cfg.model, 8, 32).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in start.state_dict().items())
    groups = {g["name"]: g for g in param_groups(start, 1e-4, 1e-3, 1e-4)}
    head_ids = {id(p) for n in ("head", "head_no_decay") for p in groups[n]["params"]}
    assert all(id(p) in head_ids for p in start.colorizer.parameters())
    assert groups["head"]["lr"] == 1e-3 and groups["body"]["lr"] == 1e-4
    body_ids = {id(p) for n in ("body", "body_no_decay") for p in groups[n]["params"]}
    assert body_ids == {id(p) for p in start.encoder.parameters()}

    reset_accelerate_state()
    finetune(cfg)
    trained = load_file(tmp_path / "col" / "export" / "regressor.safetensors")
    initial = start.state_dict()
    col_keys = [k for k in initial if k.startswith("colorizer.") and "running" not in k
                and "num_batches" not in k]
    assert len(col_keys) == 17
    changed = [k for k in col_keys if not torch.equal(trained[k], initial[k])]
    assert changed == col_keys, sorted(set(col_keys) - set(changed))


# ----------------------------------------------------------------------------------------------
# A short synthetic run: fine-tune, evaluate, predict, reload; an SSL-initialised run
# ----------------------------------------------------------------------------------------------

def test_scratch_finetune_evaluate_predict_and_round_trip(tmp_path):
    from ddpm_landmarks.inference.runs import evaluate_run, load_trained_run
    syn = tmp_path / "syn"
    cfg = load_config(FINETUNE, [
        "model.arch=smp_unet", "model.encoder=resnet18", "model.init=scratch",
        "model.pretrained_path=", "optim.lr=2e-3", "optim.head_lr=2e-3",
        "optim.warmup_steps=0", "optim.schedule=constant", f"data.root={syn}",
        "data.synthetic_num_images=24", "data.synthetic_image_size=64", "data.image_size=64",
        "data.synthetic_num_landmarks=6", "fewshot.budget=8", "fewshot.val_count=4",
        "augment.rotation_deg=0", "augment.scale=[1.0, 1.0]", "augment.translate=0",
        "augment.flip_prob=0", "augment.noise_std=0", "train.batch_size=4",
        "train.max_steps=20", "train.eval_every=10", "train.checkpoint_every=20",
        "train.log_every=1", "train.num_workers=0", "logger.kind=none",
        f"run.output_dir={tmp_path}", "run.name=smp"], cls=FinetuneConfig)
    summary = finetune(cfg)
    run_dir = tmp_path / "smp"
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(curve) == 20 and np.isfinite(curve).all()
    assert np.mean(curve[-4:]) < 0.8 * np.mean(curve[:4]), curve
    assert np.isfinite(summary["best"]) and (run_dir / "best" / "regressor.json").is_file()
    meta = json.loads((run_dir / "export" / "regressor.json").read_text())
    assert meta["regressor"]["arch"] == "smp_unet" and "unet_config" not in meta
    # The resume guard reads the smp head too.
    with pytest.raises(ConfigError, match="predicts 6 landmarks but this run's data has 5"):
        check_resumed_landmarks(read_checkpoint(checkpoint_dir(run_dir, 20), 0, False), 5)

    run = load_trained_run(run_dir, device="cpu")
    assert run.model.cfg.arch == "smp_unet" and not run.model.training
    result = evaluate_run(run, "test1")
    metrics = json.loads((run_dir / "eval_test1" / "metrics.json").read_text())
    assert metrics["n"] == 8 * 6 and result["n"] == 8 * 6
    assert (run_dir / "eval_test1" / "predictions.csv").is_file()
    assert any((run_dir / "eval_test1" / "overlays").iterdir())

    folder = tmp_path / "new_images"
    folder.mkdir()
    for rec in result["dataset"].records[:3]:
        shutil.copy(rec.image_path, folder / Path(rec.image_path).name)
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(run_dir), "--images", str(folder), "--out", str(out),
                     "--device", "cpu"]) == 0
    assert len(out.read_text().splitlines()) == 1 + 3 * 6

    # save -> load: identical outputs, no weights file or export needed.
    model = load_regressor(run_dir / "export").eval()
    save_regressor(model, tmp_path / "copy")
    again = load_regressor(tmp_path / "copy").eval()
    assert again.cfg == model.cfg
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert model(x).abs().max() > 0.05                # trained, not the ~0 initial head


def test_finetune_from_ssl_export_starts_from_its_encoder(tmp_path):
    state = random_encoder_state("resnet18", 3, seed=7)
    export = write_ssl_export(tmp_path / "ssl_pretrain" / "export", state)
    cfg = load_config(FINETUNE, [
        "model.arch=smp_unet", "model.encoder=resnet18", "model.init=pretrained",
        f"model.pretrained_path={export}", "model.freeze=encoder",
        f"data.root={tmp_path / 'syn'}", "data.synthetic_num_images=12",
        "data.synthetic_image_size=64", "data.image_size=32", "fewshot.budget=4",
        "fewshot.val_policy=none", "train.batch_size=2", "train.max_steps=2",
        "train.eval_every=0", "train.checkpoint_every=0", "train.num_workers=0",
        "logger.kind=none", f"run.output_dir={tmp_path}", "run.name=ssl"], cls=FinetuneConfig)
    finetune(cfg)
    trained = load_file(tmp_path / "ssl" / "export" / "regressor.safetensors")
    enc = {k[len("net.encoder."):]: v for k, v in trained.items() if k.startswith("net.encoder.")}
    assert enc.keys() == state.keys()
    assert all(torch.equal(enc[k], v) for k, v in state.items())
    # ... and the export is not needed to load the fine-tuned model.
    shutil.rmtree(export)
    loaded = load_regressor(tmp_path / "ssl" / "export")
    assert_encoder_equals(loaded, state)
