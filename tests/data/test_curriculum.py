"""Curricular pretraining (data/curriculum.py): stage spans and errors, augmentation strength,
the step-aware sampler, and end to end through pretrain(): the stage switches at the configured
optimiser steps (logged train/stage), no image of a later stage's pool is trained on earlier
(images whose gray level is their id), resolution per stage, resume mid-curriculum, SSL views,
two processes."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.common import AugmentConfig
from ddpm_landmarks.config.pretrain import CurriculumStage, PretrainConfig, ViewConfig
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.data.curriculum import (
    CURRICULUM_FILE,
    Curriculum,
    CurriculumSampler,
    Stage,
    scale_augment,
    scale_views,
    stage_image_list,
    stage_pools,
    stage_spans,
)
from ddpm_landmarks.data.unlabeled import ExclusionReport, MixedPools, UnlabeledPool
from ddpm_landmarks.errors import ConfigError, DataError
from ddpm_landmarks.methods.registry import PRETRAINING_METHODS
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pretrain" / "synthetic.yaml"
SCRIPT = ROOT / "tests" / "accelerate_scripts" / "curriculum_two_procs.py"
_spec = importlib.util.spec_from_file_location("curriculum_two_procs", SCRIPT)
twoproc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(twoproc)
POOLS = {"a": range(10, 15), "b": range(20, 25), "c": range(30, 34)}   # gray level = image id


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------------------ pieces

def test_stage_spans_and_order_errors():
    stages = [CurriculumStage(until_step=3), CurriculumStage(until_step=6), CurriculumStage()]
    assert stage_spans(stages, 8) == [(1, 3), (4, 6), (7, 8)]
    assert stage_spans([CurriculumStage(until_step=3), CurriculumStage(until_step=9)], 8) \
        == [(1, 3), (4, 8)]
    cases = [([CurriculumStage(until_step=5), CurriculumStage(until_step=5)], "not after"),
             ([CurriculumStage(until_step=0), CurriculumStage()], "not after"),
             ([CurriculumStage(), CurriculumStage(until_step=5)], "until_step is missing"),
             ([CurriculumStage(until_step=8), CurriculumStage()], "would never train"),
             ([CurriculumStage(until_step=3), CurriculumStage(until_step=6)], "set its until_step")]
    for stages, message in cases:
        with pytest.raises(ConfigError, match=message):
            stage_spans(stages, 8)


def test_augment_strength_scales_ranges_and_keeps_probabilities():
    aug = AugmentConfig(rotation_deg=10, scale=(0.9, 1.1), translate=0.05, shear_deg=2,
                        brightness=0.1, contrast=0.2, gamma=(0.8, 1.25), clahe_prob=0.3,
                        noise_std=0.01, blur_prob=0.5, blur_sigma=(0.1, 1.0))
    assert scale_augment(aug, 1.0) == aug
    double = scale_augment(aug, 2.0)
    assert double.rotation_deg == 20 and double.translate == 0.1 and double.shear_deg == 4
    assert double.scale == pytest.approx((0.8, 1.2)) and double.gamma == pytest.approx((0.64, 1.5625))
    assert double.blur_sigma == pytest.approx((0.2, 2.0)) and double.noise_std == 0.02
    assert (double.clahe_prob, double.blur_prob, double.flip_prob) == (0.3, 0.5, 0.0)
    zero = scale_augment(aug, 0.0)
    assert (zero.rotation_deg, zero.scale, zero.gamma, zero.brightness) == (0, (1, 1), (1, 1), 0)
    with pytest.raises(ConfigError, match="scales must stay > 0"):
        scale_augment(aug, 11.0)                        # 1 - 0.1 * 11 < 0
    views = ViewConfig(crop_scale=(0.3, 1.0), crop_ratio=(0.75, 4 / 3), rotation_deg=10)
    half = scale_views(views, 0.5)
    assert half.crop_scale == pytest.approx((0.65, 1.0)) and half.rotation_deg == 5
    assert half.crop_ratio == pytest.approx((0.75 ** 0.5, (4 / 3) ** 0.5))
    assert scale_views(views, 0.0).crop_scale == (1.0, 1.0)
    assert half.jitter_prob == views.jitter_prob and half.blur_prob == views.blur_prob


def _fake_pools(sizes: dict[str, int]) -> MixedPools:
    return MixedPools([UnlabeledPool(n, Path(n), [Path(f"/{n}/{i}.png") for i in range(k)])
                       for n, k in sizes.items()], ExclusionReport())


def test_stage_pools_reweights_and_names_errors():
    pools = _fake_pools({"a": 3, "b": 2})
    chosen = stage_pools({"b": 2.0}, pools, "curriculum.stages[1]")
    assert [(p.name, p.weight, len(p)) for p in chosen.pools] == [("b", 2.0, 2)]
    assert [p.name for p in stage_pools({}, pools, "s").pools] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"stages\[1\].pools: unknown pool 'chest'.*'a', 'b'"):
        stage_pools({"chest": 1.0}, pools, "curriculum.stages[1]")
    with pytest.raises(ConfigError, match="weight must be > 0"):
        stage_pools({"a": 0.0}, pools, "s")
    empty = MixedPools.__new__(MixedPools)       # a pool emptied after its checks
    empty.pools, empty.report = [UnlabeledPool("a", Path("a"), [])], ExclusionReport()
    with pytest.raises(DataError, match=r"stages\[0\]: no images"):
        stage_pools({}, empty, "curriculum.stages[0]")


def test_sampler_positions_map_to_the_step_they_train_in():
    """Positions of one optimiser step share a stage; layout B=2, W=2, A=3 after 5 steps:
    12 consecutive positions per step; stage streams cycle through their pools."""
    pools = _fake_pools({"a": 3, "b": 2})
    one, two = stage_pools({"a": 1.0}, pools, "s0"), stage_pools({"b": 1.0}, pools, "s1")
    curriculum = Curriculum([Stage(0, "s0", 1, 7, one, 8, None, None, None),
                             Stage(1, "s1", 8, 20, two, 8, None, None, None)])
    sampler = CurriculumSampler(curriculum, epoch_size=40, seed=3)
    sampler.set_epoch(2)
    sampler.set_step_layout(steps_before=5, batch_size=2, num_processes=2, grad_accum=3)
    keys = list(sampler)
    assert [sampler.step_of(j) for j in (0, 11, 12, 23, 24, 39)] == [6, 6, 7, 7, 8, 9]
    assert {k[0] for k in keys[:24]} == {0} and {k[0] for k in keys[24:]} == {1}
    assert sorted(k[1] for k in keys[:3]) == [0, 1, 2]        # a round: every image once
    assert keys == list(sampler)                               # a pure function of its inputs
    sampler.set_epoch(3)
    assert keys != list(sampler)
    assert sampler.scalars(7) == {"train/stage": 0.0} and sampler.scalars(8)["train/stage"] == 1


# ------------------------------------------------------------------------------ end to end

def _pool_folders(root: Path) -> dict[str, Path]:
    """Constant images whose gray level is their id (stretched, never augmented: exact)."""
    folders = {}
    for name, ids in POOLS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in ids:
            cv2.imwrite(str(folder / f"{name}{i}.png"), np.full((24, 20), i, np.uint8))
        folders[name] = folder
    return folders


def _install(monkeypatch, name: str, recorder) -> None:
    monkeypatch.setitem(PRETRAINING_METHODS, name, None)          # restored after the test
    twoproc.install(PRETRAINING_METHODS, name, recorder)


# Augmentation strength 0 in every stage (the config's own ranges are not): exact gray levels.
STAGES = ('[{name: generic, until_step: 3, pools: {a: 1.0}, augment_strength: 0}, '
          '{until_step: 6, pools: {a: 1.0, b: 1.0}, augment_strength: 0}, '
          '{name: in-domain, pools: {c: 1.0}, image_size: 16, augment_strength: 0}]')


def _overrides(tmp_path: Path, folders: dict[str, Path], **extra) -> list[str]:
    values = {"data.root": str(tmp_path / "synthetic"), "data.image_size": 32,
              "data.synthetic_num_images": 12, "data.synthetic_image_size": 32,
              "data.synthetic_num_landmarks": 2, "unlabeled.labelled_splits": "[]",
              "unlabeled.pools": "[" + ", ".join(f"{{path: {p}, name: {n}}}"
                                                 for n, p in folders.items()) + "]",
              "curriculum.stages": STAGES, "train.batch_size": 2, "train.grad_accum": 3,
              "train.max_steps": 8, "train.num_workers": 0, "train.checkpoint_every": 2,
              "train.image_every": 0, "train.log_every": 1, "train.ema": "false",
              "augment.noise_std": 0.0, "optim.warmup_steps": 1, "logger.kind": "none",
              "run.output_dir": str(tmp_path / "runs"), "run.name": "cur"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _run(overrides: list[str]) -> None:
    from ddpm_landmarks.pretrain import pretrain
    reset_accelerate_state()
    pretrain(load_config(CONFIG, overrides, cls=PretrainConfig))


def _check_stages(records: list[dict]) -> None:
    for r in records:
        pool = "a" if r["step"] <= 3 else "ab" if r["step"] <= 6 else "c"
        allowed = {i for name in pool for i in POOLS[name]}
        assert set(r["ids"]) <= allowed, r
        assert r["side"] == (16 if r["step"] >= 7 else 32), r


def test_ddpm_curriculum_switches_at_steps_and_never_draws_ahead(tmp_path, monkeypatch):
    folders = _pool_folders(tmp_path / "pools")
    # 10 images in the largest stage = an epoch of 5 micro-batches of 2: with grad_accum 3 an
    # epoch is 2 optimiser steps (3 + 2 micro-batches: accelerate syncs at the epoch end).
    recorder = twoproc.Recorder()
    _install(monkeypatch, "ddpm", recorder)
    _run(_overrides(tmp_path, folders))
    run = tmp_path / "runs" / "cur"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/stage"]) for m in metrics] == \
        [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2), (8, 2)]
    steps = [r["step"] for r in recorder.records]
    assert steps == [1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 6, 6, 7, 7, 7, 8, 8]
    _check_stages(recorder.records)
    seen = {r["step"]: set() for r in recorder.records}
    for r in recorder.records:
        seen[r["step"]].update(r["ids"])
    mixed = set().union(*(seen[s] for s in (4, 5, 6)))
    assert mixed & set(POOLS["a"]) and mixed & set(POOLS["b"])   # both pools of stage 1
    # Audit: every image of any stage, then each stage's own list, and the resolved stages.
    listed = [ln for ln in (run / "pretrain_images.txt").read_text().splitlines()
              if ln and not ln.startswith("#")]
    assert {Path(p).parent.name for p in listed} == {"a", "b", "c"} and len(listed) == 14
    stage2 = (run / stage_image_list(2)).read_text()
    assert "/c/" in stage2 and "/a/" not in stage2
    resolved = json.loads((run / CURRICULUM_FILE).read_text())["stages"]
    assert [(s["name"], s["first_step"], s["last_step"], s["images"], s["image_size"])
            for s in resolved] == [("generic", 1, 3, 5, 32), ("stage1", 4, 6, 10, 32),
                                   ("in-domain", 7, 8, 4, 16)]
    assert {s["augment"]["rotation_deg"] for s in resolved} == {0.0}    # config: 5 degrees


def _weights(run: Path, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def test_resume_mid_curriculum_continues_in_the_resumed_steps_stage(tmp_path, monkeypatch):
    """Killed in step 6 (stage 1), resumed from the step-5 checkpoint (mid-epoch): steps 6-8
    train on exactly the items of the uninterrupted run, in stages 1, 2, 2."""
    folders = _pool_folders(tmp_path / "pools")
    every_step = {"train.checkpoint_every": 1, "train.keep_checkpoints": 10}
    straight = twoproc.Recorder()
    _install(monkeypatch, "ddpm", straight)
    _run(_overrides(tmp_path, folders, **every_step, **{"run.name": "straight"}))

    killed = twoproc.Recorder(kill_at=6)
    _install(monkeypatch, "ddpm", killed)
    with pytest.raises(twoproc.Killed):
        _run(_overrides(tmp_path, folders, **every_step, **{"run.name": "resumed"}))
    resumed = twoproc.Recorder(first_step=6)
    _install(monkeypatch, "ddpm", resumed)
    _run(_overrides(tmp_path, folders, **every_step, **{"run.name": "resumed",
                                                        "train.resume": "latest"}))
    after = [r for r in straight.records if r["step"] >= 6]
    assert resumed.records == after and {r["step"] for r in after} == {6, 7, 8}
    _check_stages(resumed.records)
    run = tmp_path / "runs" / "resumed"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/stage"]) for m in logged][-3:] == [(6, 1), (7, 2), (8, 2)]
    a, b = _weights(tmp_path / "runs" / "straight", 8), _weights(run, 8)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_simclr_views_follow_the_stage_strength(tmp_path, monkeypatch):
    """SSL two-view datasets per stage: strength 0 = two identical, unaugmented views; the
    second stage (its own explicit views values) draws different views."""
    folders = _pool_folders(tmp_path / "pools")
    recorder = twoproc.Recorder()
    _install(monkeypatch, "simclr", recorder)
    stages = ('[{until_step: 2, pools: {a: 1.0, b: 1.0}, augment_strength: 0}, '
              '{pools: {c: 1.0}, views: {rotation_deg: 30.0}}]')
    _run(_overrides(tmp_path, folders, **{
        "method": "simclr", "curriculum.stages": stages, "train.max_steps": 4,
        "train.grad_accum": 1, "train.batch_size": 4, "ssl.hidden_dim": 32,
        "optim.max_grad_norm": "null"}))
    first = [r for r in recorder.records if r["step"] <= 2]
    later = [r for r in recorder.records if r["step"] > 2]
    assert len(first) == len(later) == 2
    assert all(r["same_views"] and set(r["ids"]) <= set(POOLS["a"]) | set(POOLS["b"])
               for r in first)
    assert not any(r["same_views"] for r in later)
    resolved = json.loads((tmp_path / "runs" / "cur" / CURRICULUM_FILE).read_text())["stages"]
    assert resolved[0]["views"]["crop_scale"] == [1.0, 1.0] and resolved[0]["augment"] is None
    assert resolved[1]["views"]["rotation_deg"] == 30.0


@pytest.mark.parametrize("stages, message", [
    ('[{until_step: 4, pools: {chest: 1.0}}, {}]', "unknown pool 'chest'; the pools of this run"),
    ('[{until_step: 4}, {until_step: 2}, {}]', "until_step=2 is not after"),
    ('[{until_step: 4, views: {rotation_deg: 5.0}}, {}]', "ssl.views are for the SSL methods"),
    ('[{until_step: 4, image_size: 30}, {}]', "multiple of 4"),
    ('[{until_step: 4, augment: {rotashun: 1.0}}, {}]', "unknown config key"),
    ('[{until_step: 4, augment_strength: -1.0}, {}]',
     "augment_strength: -1.0 is outside the allowed range >= 0"),
])
def test_cli_errors_name_the_stage(tmp_path, capsys, stages, message):
    folders = _pool_folders(tmp_path / "pools")
    args = _overrides(tmp_path, folders, **{"curriculum.stages": stages})
    assert cli_main(["pretrain", str(CONFIG), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "curriculum.stages[" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_each_step_on_the_one_process_items(tmp_path, monkeypatch):
    """2 processes x batch 2 under accelerate launch: every process is in the configured stage
    at every step, and the two processes' items of a step are the 1 process x batch 4 items."""
    folders = _pool_folders(tmp_path / "pools")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf")}
    accelerate = Path(sys.executable).parent / "accelerate"
    two = _overrides(tmp_path, folders, **{"run.name": "two", "train.checkpoint_every": 0})
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(SCRIPT), str(tmp_path), str(CONFIG), *two]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"records_{r}.json").read_text()) for r in (0, 1)]

    one = twoproc.Recorder()
    _install(monkeypatch, "ddpm", one)
    _run(_overrides(tmp_path, folders, **{"run.name": "one", "train.batch_size": 4,
                                          "train.checkpoint_every": 0}))
    for records in ranks:
        _check_stages(records)
        assert [r["step"] for r in records] == [r["step"] for r in one.records]
    for r0, r1, single in zip(*ranks, one.records):
        assert sorted(r0["ids"] + r1["ids"]) == sorted(single["ids"])
