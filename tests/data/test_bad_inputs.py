"""Bad input is refused before a run starts: the battery of experiments/faults/bad_inputs.py
(each kind: its error class and message from the entry function, then `ddpm-landmarks <command>`
exits 2 and writes nothing into the run folder), skip mode leaving broken images out up front
(and a run that trains without them), `data check`, and the shared datasets passing the checks.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.classify import ClassifyConfig
from ddpm_landmarks.config.common import DataConfig
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.checks import check_run_inputs
from ddpm_landmarks.data.record_checks import (
    LANDMARK_MARGIN,
    landmark_problem,
    record_problems,
)
from ddpm_landmarks.data.registry import DEFAULT_SUBDIRS, build_dataset
from ddpm_landmarks.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _load_battery():
    spec = importlib.util.spec_from_file_location(
        "faults_bad_inputs", ROOT / "experiments" / "faults" / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


battery = _load_battery()


def test_the_battery_has_at_least_20_kinds():
    assert len({case.kind for case in battery.CASES}) == len(battery.CASES) >= 20


@pytest.mark.parametrize("case", battery.CASES, ids=lambda case: case.kind)
def test_bad_input_is_refused_before_the_run_starts(case, tmp_path):
    config, overrides, run_dir = battery.prepare(case, tmp_path / "entry")
    with pytest.raises(case.error, match=case.message):
        battery.call_entry(case, config, overrides)
    assert battery.nothing_written(run_dir)
    status, err, run_dir = battery.run_cli(case, tmp_path / "cli")
    assert status == 2 and re.search(r"^error: ", err, re.M), err
    assert re.search(case.message, err), err
    assert battery.nothing_written(run_dir), sorted(p.name for p in run_dir.iterdir())


def test_the_intact_dataset_passes(tmp_path):
    configs = battery.run_configs(tmp_path, battery.write_dataset(tmp_path / "dataset"))
    report = check_run_inputs(load_config(configs["finetune"], cls=FinetuneConfig))
    assert report.run == "fine-tuning" and report.skipped == []
    # the run's own draw: 4 training + 2 validation images of train, and all 4 of test1
    assert [count for _, count in report.groups] == [4, 2, 4] and report.images == 10


# ------------------------------------------------------------------------ on_bad_sample=skip

def _damage(root: Path, name: str, keep_bytes: int) -> None:
    path = root / "images" / name
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_skip_leaves_broken_images_out_up_front_and_the_run_never_meets_them(tmp_path):
    root = battery.write_dataset(tmp_path / "dataset")
    _damage(root, "002.png", 100)                   # truncated, in the training pool
    _damage(root, "009.png", 0)                     # empty, in test1
    configs = battery.run_configs(tmp_path, root)
    overrides = ["data.on_bad_sample=skip", "fewshot.budget=null", "fewshot.val_policy=none"]
    cfg = load_config(configs["finetune"], overrides, cls=FinetuneConfig)
    report = check_run_inputs(cfg)
    assert len(report.skipped) == 2
    assert any("002.png: truncated PNG" in m for m in report.skipped)
    assert any("009.png: empty file" in m for m in report.skipped)
    assert [count for _, count in report.groups] == [5, 3]     # train minus 1, test1 minus 1
    assert "left out before the run (on_bad_sample=skip): 2" in "\n".join(report.lines())
    dataset = build_dataset(cfg.data)
    assert "002" not in dataset.ids and "009" not in dataset.ids and len(dataset) == 8
    # The run trains on the whole (shrunk) pool: the broken file is not in it.
    assert cli_main(["finetune", str(configs["finetune"]), *overrides]) == 0
    run_dir = tmp_path / "runs" / "finetune"
    trained = (run_dir / "split_train_ids.txt").read_text().split()
    assert sorted(trained) == ["000", "001", "003", "004", "005"]
    assert (run_dir / "export").is_dir()


def test_skip_leaves_undecodable_pool_images_out(tmp_path):
    root = battery.write_dataset(tmp_path / "dataset")
    _damage(root, "004.png", 60)
    configs = battery.run_configs(tmp_path, root)
    cfg = load_config(configs["pretrain"], [
        "data.on_bad_sample=skip", "unlabeled.labelled_splits=[]",
        f"unlabeled.pools=[{{path: '{root}/images', name: all}}]"], cls=PretrainConfig)
    report = check_run_inputs(cfg)
    assert report.groups == [("pool all", 9)] and len(report.skipped) == 1
    assert "004.png: truncated PNG" in report.skipped[0]


def test_skip_leaves_undecodable_labelled_images_out_of_a_classification_task(tmp_path):
    root = battery.write_dataset(tmp_path / "dataset")
    rows = [f"{i:03d}.png,{'a' if i % 2 else 'b'}" for i in range(battery.NUM_IMAGES)]
    (root / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    _damage(root, "003.png", 0)
    configs = battery.run_configs(tmp_path, root)
    with pytest.raises(DataError, match=r"003\.png: empty file.*classification run reads"):
        check_run_inputs(load_config(configs["classify"], cls=ClassifyConfig))
    report = check_run_inputs(load_config(configs["classify"], ["data.on_bad_sample=skip"],
                                          cls=ClassifyConfig))
    assert len(report.skipped) == 1 and "003.png: empty file" in report.skipped[0]
    assert sum(count for _, count in report.groups) == 9


def test_errors_list_every_problem_at_once(tmp_path):
    root = battery.write_dataset(tmp_path / "dataset")
    for name in ("006.png", "007.png", "008.png"):
        _damage(root, name, 0)
    configs = battery.run_configs(tmp_path, root)
    with pytest.raises(DataError, match=r"3 images the fine-tuning run reads fail the start-up "
                       r"checks; data.on_bad_sample=skip leaves such images out:\n") as err:
        check_run_inputs(load_config(configs["finetune"], cls=FinetuneConfig))
    assert all(f"{name}: empty file" in str(err.value)
               for name in ("006.png", "007.png", "008.png"))


# ------------------------------------------------------------------------ data check

def test_data_check_prints_what_it_checked(tmp_path, capsys):
    configs = battery.run_configs(tmp_path, battery.write_dataset(tmp_path / "dataset"))
    assert cli_main(["data", "check", str(configs["finetune"])]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning inputs (data.on_bad_sample=error)" in out
    assert "dataset:train validation images: 2 images" in out
    assert "all pass: 10 image files decode" in out
    assert cli_main(["data", "check", str(configs["pretrain"])]) == 0
    assert "pool generic:train: 6 images" in capsys.readouterr().out
    _damage(tmp_path / "dataset", "007.png", 50)
    assert cli_main(["data", "check", str(configs["finetune"])]) == 2
    assert "007.png: truncated PNG" in capsys.readouterr().err


# ------------------------------------------------------------------------ the margin

@pytest.mark.parametrize("point, inside", [
    ((-0.5, -0.5), True), ((47.5, 31.5), True),                     # the image's own edges
    ((-0.5 - 0.05 * 48 + 1e-9, 10), True), ((47.5 + 0.05 * 48 - 1e-9, 10), True),
    ((-0.5 - 0.05 * 48 - 1e-6, 10), False), ((10, 31.5 + 0.05 * 32 + 1e-6), False),
    ((np.nan, np.nan), True)])                                        # missing is fine
def test_landmark_margin_is_a_fraction_of_the_image_side(point, inside):
    assert LANDMARK_MARGIN == 0.05
    assert (landmark_problem(np.array([point]), (48, 32), "x") is None) == inside


def test_shared_datasets_pass_the_checks(shared_data):
    start = time.perf_counter()
    counts = {}
    for name in ("isbi2015", "aasce_spine", "hand_dha"):
        folder = shared_data / DEFAULT_SUBDIRS[name]
        dataset = build_dataset(DataConfig(dataset=name, root=str(folder)))
        assert record_problems(dataset.name, dataset.records) == {}, name
        counts[name] = len(dataset)
    assert counts == {"isbi2015": 300, "aasce_spine": 609, "hand_dha": 9}
    print(f"{sum(counts.values())} shared images checked in {time.perf_counter() - start:.1f} s")
