"""Attention analysis (studies/attention.py): the saliency fraction, the ROI in millimetres,
input gradients, a model whose saliency is known, and the command end to end on synthetic data
for a fine-tuned regressor run, a DDPM export and an SSL encoder export."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config, to_dict
from ddpm_landmarks.data.transforms import original_to_model_matrix
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.studies.attention import (
    AttentionConfig,
    analyse,
    input_saliency,
    roi_mask,
    saliency_fraction,
)
from ddpm_landmarks.studies.attention_models import AnalysedModel, load_analysed_model
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
SYNTH = {"data.synthetic_num_images": 24, "data.synthetic_image_size": 64,
         "data.synthetic_num_landmarks": 4, "data.image_size": 32}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------------------ pure pieces

def test_fraction_is_exactly_one_inside_zero_outside_and_hand_mixed():
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), bool)
    mask[3:9, 4:12] = True
    inside = np.where(mask, rng.random((16, 16)), 0.0)       # irrational-ish values
    assert saliency_fraction(inside, mask) == 1.0
    assert saliency_fraction(np.where(mask, 0.0, rng.random((16, 16))), mask) == 0.0
    s = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert saliency_fraction(s, np.array([[True, False], [False, True]])) == pytest.approx(0.5)
    assert saliency_fraction(np.array([[0.0, 1.0, 3.0]]), np.array([[True, True, False]])) \
        == pytest.approx(0.25)
    assert math.isnan(saliency_fraction(np.zeros((2, 2)), np.ones((2, 2), bool)))
    with pytest.raises(ValueError, match="shape"):
        saliency_fraction(np.ones((2, 2)), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=">= 0"):
        saliency_fraction(-np.ones((2, 2)), np.ones((2, 2), bool))


def test_roi_discs_by_hand_with_anisotropic_spacing():
    identity = np.eye(3)
    disc = roi_mask(np.array([[5.0, 5.0]]), identity, (1.0, 1.0), 2.0, 11)
    assert disc.sum() == 13 and disc[5, 7] and disc[7, 5] and not disc[7, 7]   # r^2 = 4
    # x spacing 0.5 mm, y 1 mm, radius 1 mm: 2 px either side in x, 1 px in y.
    ellipse = roi_mask(np.array([[5.0, 5.0]]), identity, (0.5, 1.0), 1.0, 11)
    assert ellipse.sum() == 7 and ellipse[5, 3] and ellipse[4, 5] and not ellipse[4, 6]
    missing = roi_mask(np.array([[np.nan, np.nan], [1.0, 1.0]]), identity, (1.0, 1.0), 0.5, 4)
    assert missing.sum() == 1 and missing[1, 1]


def test_roi_area_in_millimetres_on_a_stretched_grid():
    """400 x 800 original pixels of 0.1 mm stretched onto 64 x 64: a model pixel covers
    0.625 x 1.25 mm, so a 10 mm disc (314.2 mm^2) is ~402 model pixels, an ellipse there."""
    to_original = np.linalg.inv(original_to_model_matrix((400, 800), 64, "stretch"))
    mask = roi_mask(np.array([[200.0, 400.0]]), to_original, (0.1, 0.1), 10.0, 64)
    assert mask.sum() == pytest.approx(math.pi * 100 / (0.625 * 1.25), rel=0.03)
    rows, cols = np.nonzero(mask)
    assert (cols.max() - cols.min() + 1) == pytest.approx(2 * 10 / 0.625, abs=1)
    assert (rows.max() - rows.min() + 1) == pytest.approx(2 * 10 / 1.25, abs=1)


def test_hull_adds_the_region_between_landmarks():
    points = np.array([[2.0, 2.0], [17.0, 2.0], [2.0, 17.0]])
    discs = roi_mask(points, np.eye(3), (1.0, 1.0), 1.0, 20)
    hull = roi_mask(points, np.eye(3), (1.0, 1.0), 1.0, 20, kind="hull")
    assert not discs[6, 6] and hull[6, 6] and not hull[15, 15]
    assert (hull | discs).sum() == hull.sum()          # the hull contains the discs
    with pytest.raises(ConfigError, match="discs | hull"):
        roi_mask(points, np.eye(3), (1.0, 1.0), 1.0, 20, kind="box")


def test_input_saliency_of_a_linear_model_is_its_weights():
    w = torch.randn(1, 1, 6, 6)
    images = torch.randn(3, 1, 6, 6)
    saliency = input_saliency(lambda x: (x * w).flatten(1).sum(1), images)
    assert torch.equal(saliency, w.abs()[0].expand(3, 6, 6))


# ------------------------------------------------------------------------------ analysis

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def synth_data(root: Path) -> DataConfig:
    cfg = load_config(ROOT / "configs" / "synthetic.yaml",
                      [f"data.root={root}"] + [f"{k}={v}" for k, v in SYNTH.items()])
    return cfg.data


def test_a_model_that_looks_at_the_left_half(synth_root, tmp_path):
    """output = sum of the left half's pixels: saliency 1 there, 0 elsewhere, so an image's
    fraction is the ROI's share of the left half's pixels: computed here from the same masks."""
    size = 32
    model = torch.nn.Conv2d(1, 1, 1)                     # only carries the device
    target = AnalysedModel("half", tmp_path, model, lambda x: x[..., : size // 2].flatten(1).sum(1),
                            "left half", size, "stretch")
    data = synth_data(synth_root)
    summary = analyse(target, data, "test1", tmp_path / "out",
                      AttentionConfig(radius=4.0, images=5, overlays=2))
    from ddpm_landmarks.config.common import AugmentConfig
    from ddpm_landmarks.data.registry import build_dataset
    from ddpm_landmarks.data.transforms import LandmarkTransform
    test = build_dataset(data).split("test1")
    transform = LandmarkTransform(data, AugmentConfig(flip_prob=0.0))
    with open(tmp_path / "out" / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 == summary["images"]
    for i, row in enumerate(rows):
        sample = test[i]
        mask = roi_mask(sample.landmarks, transform(sample).to_original, sample.spacing_mm, 4.0,
                        size)
        assert row["id"] == sample.id
        assert float(row["fraction"]) == pytest.approx(mask[:, : size // 2].sum() / (size * size / 2),
                                                       abs=1e-6)
        assert float(row["roi_area"]) == pytest.approx(mask.mean(), abs=1e-6)
    fractions = [float(r["fraction"]) for r in rows]             # CSV: 6 significant digits
    assert summary["fraction"]["mean"] == pytest.approx(np.mean(fractions), rel=1e-5)
    assert summary["fraction"]["sd"] == pytest.approx(np.std(fractions, ddof=1), rel=1e-3)
    assert summary["roi"] == {"kind": "discs", "radius": 4.0, "unit": "mm"}
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def models(synth_root, tmp_path_factory) -> dict[str, Path]:
    """A 2-step fine-tuning run (tiny U-Net from scratch), a DDPM export and a SimCLR export
    (random init: the command's plumbing, not what they learned)."""
    out = tmp_path_factory.mktemp("models")
    common = [f"data.root={synth_root}"] + [f"{k}={v}" for k, v in SYNTH.items()]
    reset_accelerate_state()
    assert cli_main(["finetune", str(ROOT / "configs" / "finetune" / "synthetic.yaml"), *common,
                     "model.init=scratch", "model.pretrained_path=''", "train.max_steps=2",
                     "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=0",
                     "train.num_workers=0", "fewshot.budget=4", "fewshot.val_policy=none",
                     "logger.kind=none", f"run.output_dir={out}", "run.name=ft"]) == 0
    reset_accelerate_state()
    from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
    paths = {"regressor": out / "ft"}
    for name, config in (("ddpm", "synthetic.yaml"), ("simclr", "simclr_synthetic.yaml")):
        cfg = load_config(ROOT / "configs" / "pretrain" / config,
                          common + ["ssl.hidden_dim=32"], cls=PretrainConfig)
        method = PRETRAINING_METHODS[name](cfg)
        method.export(method.model, out / name / "export", to_dict(cfg))
        paths[name] = out / name                       # a pretraining run folder: its export/
    return paths


@pytest.mark.parametrize("kind", ["regressor", "ddpm", "simclr"])
def test_command_end_to_end(models, synth_root, tmp_path, capsys, kind):
    out = tmp_path / "att"
    args = ["attention", str(models[kind]), "--data", str(ROOT / "configs" / "synthetic.yaml"),
            "--split", "test1", "--images", "3", "--overlays", "2", "--radius", "3",
            "--out", str(out), f"data.root={synth_root}"] + [f"{k}={v}" for k, v in SYNTH.items()]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == {"simclr": "ssl_encoder", "ddpm": "ddpm_unet"}.get(kind, kind)
    assert summary["images"] == 3 and summary["image_size"] == 32
    with open(out / "per_image.csv") as fh:
        fractions = [float(r["fraction"]) for r in csv.DictReader(fh)]
    assert len(fractions) == 3 and all(0.0 <= f <= 1.0 for f in fractions)
    assert summary["fraction"]["mean"] == pytest.approx(np.mean(fractions), rel=1e-5)
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "saliency in ROI" in (out / "summary.md").read_text()
    assert "results:" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))


def test_command_errors(tmp_path, capsys, models, synth_root):
    (tmp_path / "empty").mkdir()
    data = ["--data", str(ROOT / "configs" / "synthetic.yaml"), f"data.root={synth_root}"] + \
        [f"{k}={v}" for k, v in SYNTH.items()]
    assert cli_main(["attention", str(tmp_path / "empty"), *data]) == 2
    assert "is none of: regressor, ddpm_unet, ssl_encoder" in capsys.readouterr().err
    assert cli_main(["attention", str(models["ddpm"]), *data, "--split", "test9"]) == 2
    assert "split 'test9' not in" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not found"):
        load_analysed_model(tmp_path / "nowhere")
