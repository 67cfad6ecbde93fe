"""Image classification: AUC / accuracy metrics against hand-computed values, the label file and
its errors, every kind of encoder loading strictly (DDPM export, SSL export, ImageNet file,
fine-tuned regressor), the synthetic marker task learnt well above chance through the command
line, linear-probe freezing, resume, and the Cobb-angle labels of the real spine set."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.classify import (
    ClassifierConfig,
    ClassifyConfig,
    LabelsConfig,
)
from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.class_labels import load_label_task, sorted_classes
from ddpm_landmarks.errors import DataError
from ddpm_landmarks.evaluation.classification_metrics import (
    classification_summary,
    midranks,
    roc_auc,
)
from ddpm_landmarks.models.classifier import (
    build_classifier,
    load_classifier,
    save_classifier,
)
from ddpm_landmarks.training.engine import reset_accelerate_state

# One intra-op thread: on the shared 2-core machine two OpenMP threads per process spin against
# the other jobs (a ResNet-18 step at 64 px measured 3-4 s with two threads, 0.6 s with one).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "classify" / "synthetic.yaml"
SYNTH = {"data.synthetic_num_images": 120, "data.synthetic_image_size": 128,
         "data.image_size": 64}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "set"


def overrides(synth_root, out, **values) -> list[str]:
    base = {**SYNTH, "data.root": synth_root, "train.num_workers": 0, "logger.kind": "none",
            "run.output_dir": out, "run.name": "cls"}
    base.update(values)
    return [f"{k}={v}" for k, v in base.items()]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def test_midranks_and_auc_against_hand_computed_values():
    assert midranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # sklearn's documented example: 3 of the 4 positive-negative pairs are ordered right.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Ties count one half: pairs (0.5 > 0.5: 1/2), (0.5 > 0.2), (0.9 > 0.5), (0.9 > 0.2).
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    assert roc_auc([1, 1, 1], [1, 0, 1]) == pytest.approx(0.5)
    assert roc_auc([0.2, 0.1], [1, 1]) != roc_auc([0.2, 0.1], [1, 1])      # NaN: no negative
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([0.1, float("nan")], [0, 1])


def _tied_scores():
    rng = np.random.default_rng(0)
    return rng.integers(0, 6, size=60) / 5.0, rng.random(60) < 0.4     # many ties


def test_auc_equals_pair_counting():
    scores, positive = _tied_scores()
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, positive) == pytest.approx(pairs / (pos.size * neg.size))


def test_auc_equals_sklearn_when_installed():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")      # not a dependency
    scores, positive = _tied_scores()
    assert roc_auc(scores, positive) == pytest.approx(
        sklearn_metrics.roc_auc_score(positive, scores))


def test_summary_hand_computed_three_classes():
    y = [0, 0, 1, 1, 2, 2]
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1],
                      [.1, .2, .7], [.5, .3, .2]])
    s = classification_summary(y, probs, ["a", "b", "c"])
    # predictions 0 1 1 1 2 0
    assert s["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # class a vs rest: positives .8 .3, negatives .2 .1 .1 .5 -> pairs 4 + 3 of 8
    assert s["per_class"]["a"]["auc"] == pytest.approx(7 / 8)
    # class c: positives .7 .2, negatives .1 x4 -> all 8 pairs ordered
    assert s["per_class"]["c"]["auc"] == pytest.approx(1.0)
    assert s["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    aucs = [s["per_class"][c]["auc"] for c in "abc"]
    assert s["macro_auc"] == pytest.approx(np.mean(aucs)) and s["auc_classes"] == 3


def test_classes_sort_numerically_when_integers():
    assert sorted_classes(["10", "2", "1"]) == ["1", "2", "10"]
    assert sorted_classes(["severe", "mild", "10"]) == ["10", "mild", "severe"]


# ----------------------------------------------------------------------------------------------
# Label files
# ----------------------------------------------------------------------------------------------

def _folder(tmp_path: Path, names) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in names:
        cv2.imwrite(str(folder / name), np.full((20, 30), 100, np.uint8))
    return folder


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _task(tmp_path, text, folder=None, data=None, **labels):
    file = _write(tmp_path / "labels.csv", text)
    cfg = LabelsConfig(file=file, images=str(folder) if folder else "", **labels)
    return load_label_task(cfg, data or DataConfig(train_split="train", eval_split="test"))


def test_label_file_from_a_folder_and_its_errors(tmp_path):
    folder = _folder(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    task = _task(tmp_path, "image,label,split\na.png,1,train\nb,10,train\nc.png,2,train\n"
                 "d,2,test\n", folder)
    assert task.classes == ["1", "2", "10"]
    assert [(i.id, i.name, i.split) for i in task.images][:2] == [("a", "a.png", "train"),
                                                                   ("b", "b", "train")]
    cases = {
        "image,label,split\na.png,x,train\nzz.png,y,train\n":
            r"labels.csv line 3: image 'zz.png' not found in image folder",
        "image,label,split\na.png,x,train\nb.png,y,tset\n":
            r"labels.csv line 3: split 'tset' is not one of \['train', 'test'\]",
        "image,class,split\na.png,x,train\n": r"labels.csv line 1: no label column 'label'",
        "image,label,split\na.png,x,train\nb.png,y,test\n":
            r"labels.csv line 3: class 'y' has no training image",
        "image,label,split\na.png,x,train\na,y,train\n": r"line 3: image 'a' is labelled",
        "image,label,split\na.png,,train\n": r"line 2: empty label",
        "image,label\na.png,x\n": r"no split column",
    }
    for text, message in cases.items():
        with pytest.raises(DataError, match=message):
            task = _task(tmp_path, text, folder)
            task.check_training_classes(task.split("train"), "all")
    with pytest.raises(DataError, match="a single|at least 2"):
        _task(tmp_path, "image,label,split\na.png,x,train\nb.png,x,test\n", folder)


def test_label_file_over_a_registry_dataset(synth_root, tmp_path):
    data = load_config(CONFIG, overrides(synth_root, tmp_path), cls=ClassifyConfig).data
    # No split column: the dataset's own (the generic layout's manifest) gives train / test1.
    task = _task(tmp_path, "image,label\n0000.png,a\n0001,b\n0119,a\n", data=data)
    assert [(i.id, i.split) for i in task.images] == [("0000", "train"), ("0001", "train"),
                                                      ("0119", "test1")]
    assert task.images[0].path.name == "0000.png"
    with pytest.raises(DataError, match=r"labels.csv line 3: image '9999' not found in dataset "
                                        r"synthetic"):
        _task(tmp_path, "image,label\n0000.png,a\n9999,b\n", data=data)


def test_command_line_names_the_bad_line_and_a_resumed_run_keeps_its_classes(synth_root,
                                                                            tmp_path, capsys):
    from ddpm_landmarks.classify import check_resumed_classes
    from ddpm_landmarks.errors import ConfigError
    folder = _folder(tmp_path, ["a.png", "b.png"])
    labels = _write(tmp_path / "labels.csv", "image,label,split\na.png,x,train\nc.png,y,train\n")
    args = overrides(synth_root, tmp_path, **{"labels.file": labels, "labels.images": folder})
    assert cli_main(["classify", str(CONFIG), *args]) == 2
    assert "line 3: image 'c.png' not found" in capsys.readouterr().err
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["x", "y"]}))
    check_resumed_classes(tmp_path, ["x", "y"])
    with pytest.raises(ConfigError, match=r"started with classes \['x', 'y'\]"):
        check_resumed_classes(tmp_path, ["x", "y", "z"])


# ----------------------------------------------------------------------------------------------
# Encoders: every pretrained kind loads strictly
# ----------------------------------------------------------------------------------------------

def test_ddpm_export_loads_as_encoder_without_missing_or_unexpected_keys(tmp_path):
    from ddpm_landmarks.config.pretrain import PretrainConfig
    from ddpm_landmarks.methods.ddpm import DDPMMethod
    cfg = load_config(None, ["data.image_size=64", "model.preset=tiny"], cls=PretrainConfig)
    method = DDPMMethod(cfg)
    torch.manual_seed(1)
    for p in method.model.parameters():          # not the init: weights that must be loaded
        p.data.normal_(0, 0.02)
    method.export(method.model, tmp_path / "export", {})
    exported = load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    encoder_parts = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    model = build_classifier(ClassifierConfig(pretrained_path=str(tmp_path / "export")), 2, 64)
    body = {k[len("body."):]: v for k, v in model.state_dict().items() if k.startswith("body.")}
    assert body.keys() == {k for k in exported if k.startswith(encoder_parts)}
    for k, v in body.items():
        assert torch.equal(v, exported[k]), k
    # The encoder's forward is the U-Net's own first half: its output = the mid block's.
    captured = []
    hook = method.model.mid_block.register_forward_hook(lambda m, a, out: captured.append(out))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        method.model.eval()(x, torch.zeros(2, dtype=torch.long))
        hook.remove()
        torch.testing.assert_close(model.body(x), captured[0])
    # "drop": the time MLP and every block's time projection are gone, nothing else.
    dropped = build_classifier(ClassifierConfig(pretrained_path=str(tmp_path / "export"),
                                                timestep_mode="drop"), 2, 64)
    keys = {k[len("body."):] for k in dropped.state_dict() if k.startswith("body.")}
    assert keys == {k for k in body if "time_emb" not in k}


def test_ssl_export_and_imagenet_file_load_as_encoders(tmp_path):
    from ddpm_landmarks.config.pretrain import PretrainConfig
    from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
    cfg = load_config(None, ["method=simclr", "data.image_size=64", "ssl.in_channels=1"],
                      cls=PretrainConfig)
    method = PRETRAINING_METHODS["simclr"](cfg)
    method.export(method.model, tmp_path / "ssl", {})
    exported = load_file(tmp_path / "ssl" / "encoder.safetensors")
    model = build_classifier(ClassifierConfig(arch="smp", pretrained_path=str(tmp_path / "ssl"),
                                              gray_adapter="in_channels"), 3, 64)
    encoder = model.body.regressor.encoder.state_dict()
    assert encoder.keys() == exported.keys()
    assert all(torch.equal(encoder[k], exported[k]) for k in exported)
    assert not any("decoder" in k or "segmentation_head" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="gray_adapter=in_channels"):
        build_classifier(ClassifierConfig(arch="smp", pretrained_path=str(tmp_path / "ssl")),
                         3, 64)
    # ImageNet offline: a local state-dict file (here random weights of the right layout).
    torch.save(exported | {"conv1.weight": exported["conv1.weight"].repeat(1, 3, 1, 1),
                           "fc.weight": torch.zeros(1000, 512)}, tmp_path / "r18.pth")
    net = build_classifier(ClassifierConfig(arch="smp", init="imagenet",
                                            imagenet_weights=str(tmp_path / "r18.pth")), 3, 64)
    state = net.body.regressor.encoder.state_dict()
    assert torch.equal(state["layer4.1.conv2.weight"], exported["layer4.1.conv2.weight"])
    assert net.body.regressor.input_std[0, 0, 0, 0] == pytest.approx(0.229)


def test_finetuned_regressor_encoder_and_save_load_round_trip(tmp_path):
    from ddpm_landmarks.config.finetune import RegressorConfig
    from ddpm_landmarks.models.registry import build_regressor
    from ddpm_landmarks.models.saved_regressor import save_regressor
    torch.manual_seed(0)
    regressor = build_regressor(RegressorConfig(arch="smp_unet", init="scratch",
                                                gray_adapter="colorize"), 4, 64)
    save_regressor(regressor, tmp_path / "ft" / "best")
    cfg = ClassifierConfig(arch="smp", init="regressor", pretrained_path=str(tmp_path / "ft"),
                           gray_adapter="colorize", head="mlp", hidden_dim=16)
    model = build_classifier(cfg, 2, 64)
    want = regressor.encoder.state_dict()
    got = model.body.regressor.encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="set model.arch=smp"):
        build_classifier(ClassifierConfig(init="regressor", pretrained_path=str(tmp_path / "ft")),
                         2, 64)
    # New parameters (head + colouriser) are what trains at head_lr.
    head_ids = {id(p) for p in model.head_parameters()}
    assert {id(p) for p in model.body.regressor.colorizer.parameters()} <= head_ids
    # Save -> load: the same outputs without the regressor on disk; classes kept in order.
    save_classifier(model, tmp_path / "cls", ["no", "yes"])
    loaded, classes = load_classifier(tmp_path / "cls")
    x = torch.randn(3, 1, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert classes == ["no", "yes"]
    # Initial prediction is uniform: the head starts near zero.
    assert torch.softmax(model(x), 1).sub(0.5).abs().max() < 1e-2


# ----------------------------------------------------------------------------------------------
# Training through the command line, freezing, resume
# ----------------------------------------------------------------------------------------------

FAST = {"model.arch": "smp", "model.init": "scratch", "model.pretrained_path": "''",
        "model.gray_adapter": "in_channels", "optim.lr": 0.002, "optim.head_lr": 0.002,
        "optim.warmup_steps": 10, "train.batch_size": 16, "train.eval_every": 30,
        "train.checkpoint_every": 60, "train.log_every": 10}


def test_synthetic_marker_task_learnt_well_above_chance(synth_root, tmp_path, capsys):
    args = overrides(synth_root, tmp_path, **{**FAST, "train.max_steps": 60})
    assert cli_main(["classify", str(CONFIG), *args]) == 0
    run = tmp_path / "cls"
    classes = json.loads((run / "classes.json").read_text())
    assert classes["classes"] == ["0", "1", "2"]
    assert sum(classes["train_counts"].values()) == 60          # 80 train - 20 validation
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/auc" in r] == [30, 60]
    assert (run / "best" / "classifier.json").is_file()
    assert cli_main(["evaluate-classifier", str(run), "--split", "test1"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "eval_test1" / "metrics.json").read_text())
    assert metrics["n"] == 40 and "| accuracy |" in out
    # chance is 1/3 (a third of the images per count): demand far more.
    assert metrics["accuracy"] >= 0.75, metrics
    assert metrics["macro_auc"] >= 0.85, metrics
    with open(run / "eval_test1" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40 and set(rows[0]) == {"image", "true", "predicted", "p_0", "p_1", "p_2"}
    acc = np.mean([r["true"] == r["predicted"] for r in rows])
    assert acc == pytest.approx(metrics["accuracy"])
    assert all(math.isclose(sum(float(r[f"p_{c}"]) for c in "012"), 1, abs_tol=1e-4)
               for r in rows)


def test_linear_probe_keeps_encoder_and_its_statistics(synth_root, tmp_path):
    from ddpm_landmarks.classify import classify
    cfg = load_config(CONFIG, overrides(synth_root, tmp_path, **{
        **FAST, "train.max_steps": 6, "train.eval_every": 3, "model.freeze": "encoder",
        "loss.class_weights": "balanced"}), cls=ClassifyConfig)
    torch.manual_seed(0)
    before = build_classifier(cfg.model, 3, 64).state_dict()
    classify(cfg)
    after = load_file(tmp_path / "cls" / "export" / "classifier.safetensors")
    encoder = [k for k in before if k.startswith("body.regressor.net.encoder.")]
    assert any("running_mean" in k for k in encoder)
    assert all(torch.equal(before[k], after[k]) for k in encoder)          # weights and BN stats
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_resumed_run_equals_uninterrupted(synth_root, tmp_path):
    from ddpm_landmarks.classify import classify
    common = {**FAST, "augment.rotation_deg": 0.0, "augment.scale": "[1.0, 1.0]",
              "augment.translate": 0.0, "augment.flip_prob": 0.0, "augment.brightness": 0.0,
              "augment.contrast": 0.0, "augment.gamma": "[1.0, 1.0]", "augment.noise_std": 0.0,
              "optim.schedule": "constant", "fewshot.budget": 24, "train.batch_size": 8,
              "train.eval_every": 4, "train.checkpoint_every": 4}

    def run(out, **values):
        cfg = load_config(CONFIG, overrides(synth_root, out, **{**common, **values}),
                          cls=ClassifyConfig)
        reset_accelerate_state()
        return classify(cfg)

    run(tmp_path / "full", **{"train.max_steps": 8})
    run(tmp_path / "cut", **{"train.max_steps": 4})          # as if killed after step 4
    summary = run(tmp_path / "cut", **{"train.max_steps": 8, "train.resume": "latest"})
    assert summary["step"] == 8
    full = load_file(tmp_path / "full" / "cls" / "export" / "classifier.safetensors")
    cut = load_file(tmp_path / "cut" / "cls" / "export" / "classifier.safetensors")
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "cut" / "cls" / "split_train_ids.txt").read_text() == \
        (tmp_path / "full" / "cls" / "split_train_ids.txt").read_text()


# ----------------------------------------------------------------------------------------------
# Real data: the Cobb-angle task of the spine set
# ----------------------------------------------------------------------------------------------

def test_cobb_angle_labels_of_the_spine_set(shared_data, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_cobb_labels", ROOT / "experiments" / "classification" / "make_cobb_labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.write_cobb_labels(shared_data / "aasce2019_spine", tmp_path / "cobb.csv")
    cfg = load_config(ROOT / "configs" / "classify" / "aasce_cobb.yaml",
                      [f"labels.file={out}", f"data.root={shared_data / 'aasce2019_spine'}"],
                      cls=ClassifyConfig)
    task = load_label_task(cfg.labels, cfg.data)
    assert task.classes == ["not_severe", "severe"]
    train, test = task.split("training"), task.split("test")
    assert (len(train), len(test)) == (481, 128)
    # max(PT, MT, TL) >= 40 degrees, counted independently from cobb_angles.csv
    with open(shared_data / "aasce2019_spine" / "cobb_angles.csv") as fh:
        severe = {r["image"] for r in csv.DictReader(fh)
                  if max(float(r[k]) for k in ("angle_PT", "angle_MT", "angle_TL")) >= 40}
    assert {i.path.name for i in task.images if i.label == "severe"} == severe
