"""Supervised transfer between landmark tasks (issue 7, item 1): `model.init=regressor` keeps a
saved regressor's body and gives it a new head for the target's landmark count (DDPM U-Net,
smp U-Net, U-Net++), with clear errors; the grid's `supervised` init kind: a synthetic
6-landmark source fine-tuning shared by two 8-landmark cells end to end, not retrained on a
rerun, a failing source recorded once; chains (ImageNet / scratch / DDPM -> source -> target,
source -> source -> target) and conflicts in the plan; the shipped transfer experiment files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ddpm_landmarks.config.finetune import RegressorConfig
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.experiments.cost import estimate
from ddpm_landmarks.experiments.grid import run_grid
from ddpm_landmarks.experiments.grid_plan import build_plan
from ddpm_landmarks.experiments.grid_schema import load_grid
from ddpm_landmarks.experiments.report import write_report
from ddpm_landmarks.models.registry import build_regressor
from ddpm_landmarks.models.regressor import param_groups
from ddpm_landmarks.models.saved_regressor import load_regressor, save_regressor
from ddpm_landmarks.models.transfer_init import HEAD_PREFIX

ROOT = Path(__file__).resolve().parents[2]
SYNTH_FT = str(ROOT / "configs/finetune/synthetic.yaml")
SYNTH_PRE = str(ROOT / "configs/pretrain/synthetic.yaml")

# Short synthetic runs (as in test_grid): a few steps each, data in the main process, no W&B.
FINETUNE = ["data.synthetic_num_images=40", "data.synthetic_image_size=128",
            "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
            "train.num_workers=0", "train.batch_size=4", "train.log_every=3",
            "fewshot.val_count=4", "eval.overlays=0", "decoder.min_peak=0.0"]


# ------------------------------------------------------------------------ model.init=regressor

@pytest.mark.parametrize("arch", ["ddpm_unet", "smp_unet", "smp_unetplusplus"])
def test_regressor_init_keeps_the_body_and_makes_a_new_head(tmp_path, arch):
    torch.manual_seed(0)
    source = build_regressor(RegressorConfig(arch=arch, init="scratch", preset="tiny"), 6, 64)
    save_regressor(source, tmp_path / "best")
    torch.manual_seed(1)                     # another draw: equal weights must come from the file
    cfg = RegressorConfig(arch=arch, init="regressor", pretrained_path=str(tmp_path / "best"))
    target = build_regressor(cfg, 8, 64)

    head = HEAD_PREFIX[arch]
    src, tgt = source.state_dict(), target.state_dict()
    body = [k for k in tgt if not k.startswith(head)]
    assert len(body) > 50 and set(body) == {k for k in src if not k.startswith(head)}
    for key in body:
        assert torch.equal(tgt[key], src[key]), key
    assert (source.head.out_channels, target.head.out_channels) == (6, 8)
    # the new head is initialised as every head: ~N(0, 1e-3^2), zero bias
    assert torch.count_nonzero(target.head.bias) == 0
    assert 0.5e-3 < target.head.weight.std().item() < 2e-3
    # only the head is new (optim.head_lr); decoder and colouriser were trained on the source
    assert {id(p) for p in target.head_parameters()} == {id(p) for p in target.head.parameters()}

    before = {k: v.clone() for k, v in target.named_parameters()}
    opt = torch.optim.AdamW(param_groups(target, body_lr=1e-3, head_lr=1e-3, weight_decay=0.0))
    target.train()
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (target(images) - 1).square().mean().backward()
    opt.step()
    moved = {k for k, v in target.named_parameters() if not torch.equal(v, before[k])}
    body_params = {k for k in before if not k.startswith(head)}
    assert {k for k in before if k.startswith(head)} <= moved
    assert len(moved & body_params) > 0.9 * len(body_params)

    # a fine-tuned target saves and loads like any regressor (evaluate / predict)
    save_regressor(target, tmp_path / "target")
    again = load_regressor(tmp_path / "target").eval()
    with torch.no_grad():
        assert torch.allclose(again(images), target.eval()(images), atol=1e-6)


def test_regressor_init_errors_name_the_problem(tmp_path):
    run = tmp_path / "spine_run"
    save_regressor(build_regressor(RegressorConfig(arch="smp_unet", init="scratch"), 6, 64),
                   run / "best")

    def build(path, **kw):
        return build_regressor(RegressorConfig(init="regressor", pretrained_path=str(path), **kw),
                               8, 64)

    with pytest.raises(FileNotFoundError, match="no_such_run.*not a saved landmark regressor.*"
                                                "no such folder"):
        build(tmp_path / "no_such_run", arch="smp_unet")
    with pytest.raises(FileNotFoundError, match="fine-tuning run folder: pass .*best"):
        build(run, arch="smp_unet")
    ddpm_export = tmp_path / "export"
    ddpm_export.mkdir()
    (ddpm_export / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(FileNotFoundError, match="DDPM pretraining export: use model.init="):
        build(ddpm_export, arch="smp_unet")
    with pytest.raises(ValueError, match="needs pretrained_path"):
        build("", arch="smp_unet")
    # the architecture is the source's: a conflicting request is an error, never ignored
    with pytest.raises(ValueError, match="model.arch=ddpm_unet conflicts .*arch=smp_unet.*"
                                         "set model.arch=smp_unet"):
        build(run / "best")
    with pytest.raises(ValueError, match="model.encoder=resnet34 conflicts .*encoder=resnet18"):
        build(run / "best", arch="smp_unet", encoder="resnet34")
    with pytest.raises(ValueError, match="model.gray_adapter=colorize conflicts"):
        build(run / "best", arch="smp_unet", gray_adapter="colorize")
    with pytest.raises(ValueError, match="input_norm"):
        build(run / "best", arch="smp_unet", input_norm="imagenet")


# ------------------------------------------------------------------------- grid: supervised

@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[int, Path]:
    """Synthetic sets with 8 (target) and 6 (source) landmarks, generated on first use."""
    return {8: tmp_path_factory.mktemp("synthetic8"), 6: tmp_path_factory.mktemp("synthetic6")}


def _source_overrides(root: Path, k: int = 6) -> list[str]:
    return [f"data.root={root}", f"data.synthetic_num_landmarks={k}", "fewshot.budget=null"]


def experiment(tmp_path: Path, roots: dict, inits: dict, **extra) -> Path:
    spec = {"name": "t", "output_dir": str(tmp_path / "runs"), "budgets": [4, 8], "seeds": [0],
            "finetune_overrides": [f"data.root={roots[8]}"] + FINETUNE,
            "pretrain_overrides": [f"data.root={roots[8]}", "train.max_steps=2"],
            "launcher": {"kind": "inline"}, "logger": {"kind": "none"},
            "datasets": {"synthetic": {"finetune": SYNTH_FT}}, "inits": inits, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_supervised_source_is_shared_by_cells_and_not_retrained(tmp_path, roots, capsys):
    path = experiment(tmp_path, roots, {
        "scratch": {"overrides": ["model.preset=tiny"]},
        "six": {"kind": "supervised", "source": SYNTH_FT, "source_init": "scratch",
                "source_overrides": _source_overrides(roots[6])}})
    grid = load_grid(path)
    plan = build_plan(grid)
    (source,) = plan.sources
    assert source.users == ["synthetic-six-N4-s0", "synthetic-six-N8-s0"]
    assert source.config.data.synthetic_num_landmarks == 6 and source.config.fewshot.budget is None
    assert source.config.model.init == "scratch"            # from source_init: scratch
    cells = {c.name: c for c in plan.cells}
    for name in source.users:
        assert cells[name].source is source
        assert cells[name].config.model.init == "regressor"
        assert cells[name].config.model.pretrained_path == str(source.run_dir / "best")
    # the dry-run cost counts the source job
    est = estimate(plan, set(), set(), done_sources={source.name})
    rows = {r["name"]: r for r in est["rows"]}
    assert rows[source.name]["kind"] == "source" and rows[source.name]["minutes"] > 0
    assert rows[source.name]["images"] == 6 * 4               # steps x batch
    assert est["minutes_left"] == pytest.approx(sum(r["minutes"] for r in est["rows"]) -
                                                rows[source.name]["minutes"])

    # first run: one cell, which needs the source
    outcome = run_grid(grid, only="six-N4", report=False)
    assert outcome["done"] == ["synthetic-six-N4-s0"], outcome
    status = json.loads((source.run_dir / "source.json").read_text())
    assert status["status"] == "done" and status["users"] == source.users
    assert status["best_val_mre"] > 0 and status["best_step"] in (3, 6)   # eval_every=3
    assert json.loads((source.run_dir / "best" / "regressor.json").read_text())[
        "num_landmarks"] == 6
    assert capsys.readouterr().out.count(f"source fine-tuning {source.name} done") == 1

    # rerun for both cells: the done one is skipped, the other starts from the same source
    # model, which is not trained again
    outcome = run_grid(load_grid(path), only="six", report=False)
    assert outcome == {"done": ["synthetic-six-N8-s0"], "failed": [],
                       "skipped": ["synthetic-six-N4-s0"]}
    assert json.loads((source.run_dir / "source.json").read_text())["finished"] == \
        status["finished"]
    assert f"source fine-tuning {source.name}" not in capsys.readouterr().out
    for name in source.users:
        meta = json.loads((cells[name].run_dir / "best" / "regressor.json").read_text())
        assert meta["num_landmarks"] == 8 and meta["regressor"]["init"] == "regressor"
        cell = json.loads((cells[name].run_dir / "cell.json").read_text())
        assert cell["source"] == source.name and cell["metrics"]["mre"] > 0


def test_failing_source_is_recorded_once_and_fails_its_cells(tmp_path, roots, capsys):
    missing = tmp_path / "no_such_export"
    path = experiment(tmp_path, roots, {
        "broken": {"kind": "supervised", "source": SYNTH_FT,
                   "source_overrides": _source_overrides(roots[6]) + [
                       "model.init=pretrained", f"model.pretrained_path={missing}"]}})
    outcome = run_grid(load_grid(path), report=False)
    assert outcome["failed"] == ["synthetic-broken-N4-s0", "synthetic-broken-N8-s0"]
    (source_dir,) = (tmp_path / "runs" / "t" / "sources").iterdir()
    status = json.loads((source_dir / "source.json").read_text())
    assert status["status"] == "failed" and str(missing) in status["error"]
    for name in outcome["failed"]:
        (cell_file,) = (tmp_path / "runs" / "t" / "cells").glob(f"{name}-*/cell.json")
        cell = json.loads(cell_file.read_text())
        assert f"source fine-tuning {source_dir.name} failed" in cell["error"]
        assert str(missing) in cell["error"]
    assert capsys.readouterr().out.count(f"source fine-tuning {source_dir.name} (") == 1
    summary = write_report(tmp_path / "runs" / "t")["files"]["summary_md"].read_text()
    assert f"| {source_dir.name} | broken | synthetic | best | failed | - |" in summary


def test_plan_expresses_chains_and_refuses_conflicts(tmp_path, roots):
    src = {"kind": "supervised", "source": SYNTH_FT}
    inits = {
        "imagenet_pp": {"kind": "imagenet", "overrides": ["model.arch=smp_unetplusplus"]},
        "scratch_pp": {"kind": "scratch", "overrides": ["model.arch=smp_unetplusplus"]},
        "ddpm": {"pretrain": SYNTH_PRE},
        "imagenet_six_pp": {**src, "source_init": "imagenet_pp",
                            "source_overrides": _source_overrides(roots[6])},
        "scratch_six_pp": {**src, "source_init": "scratch_pp",
                           "source_overrides": _source_overrides(roots[6])},
        "ddpm_six": {**src, "source_init": "ddpm",
                     "source_overrides": _source_overrides(roots[6]) + [
                         "model.timestep_mode=drop"]},
        # ImageNet -> 6 landmarks -> 4 landmarks -> the target's 8
        "two_step": {**src, "source_init": "imagenet_six_pp",
                     "source_overrides": _source_overrides(roots[6], 4)},
    }
    path = experiment(tmp_path, roots, inits, budgets=[4])
    plan = build_plan(load_grid(path))
    cells = {c.init: c for c in plan.cells}
    assert len(plan.sources) == 4 and len(plan.pretrainings) == 1
    first = cells["imagenet_six_pp"].source
    assert (first.config.model.arch, first.config.model.init) == ("smp_unetplusplus", "imagenet")
    assert cells["scratch_six_pp"].source.config.model.init == "scratch"
    for init in ("imagenet_six_pp", "scratch_six_pp", "two_step"):
        model = cells[init].config.model
        assert (model.arch, model.init) == ("smp_unetplusplus", "regressor")
    second = cells["two_step"].source
    assert second.source is first and second.config.model.pretrained_path == str(first.export_dir)
    assert f"source:{second.name}" in first.users
    ddpm_source = cells["ddpm_six"].source
    assert ddpm_source.pretraining is cells["ddpm"].pretraining
    assert ddpm_source.config.model.init == "pretrained"
    assert (cells["ddpm_six"].config.model.arch, cells["ddpm_six"].config.model.timestep_mode) \
        == ("ddpm_unet", "drop")                            # the source's body, not the default

    def plan_error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            build_plan(load_grid(path, list(overrides)))
        return str(err.value)

    assert "model.encoder=resnet34 conflicts" in plan_error(
        "inits.scratch_six_pp.overrides=[model.encoder=resnet34]")
    assert "model.arch=smp_unet conflicts" in plan_error(
        "inits.two_step.overrides=[model.arch=smp_unet]")
    assert "fine-tunes its source's model" in plan_error(
        "inits.scratch_six_pp.overrides=[model.init=scratch]")
    assert "goes round in a circle: scratch_six_pp -> two_step -> scratch_six_pp" in plan_error(
        "inits.scratch_six_pp.source_init=two_step", "inits.two_step.source_init=scratch_six_pp")
    assert "the split the cell is scored on" in plan_error(
        f"inits.scratch_six_pp.source_overrides=[data.root={roots[8]},data.train_split=test1]")

    def grid_error(**extra: dict) -> str:
        with pytest.raises(ConfigError) as err:
            build_plan(load_grid(experiment(tmp_path, roots, {**inits, **extra})))
        return str(err.value)

    assert "needs inits.bad.source" in grid_error(bad={"kind": "supervised"})
    assert "are for kind supervised, not scratch" in grid_error(
        bad={"kind": "scratch", "source": SYNTH_FT})
    assert "no init 'nope'" in grid_error(bad={**src, "source_init": "nope"})
    assert "'mean_shape' is the mean shape" in grid_error(
        mean_shape={}, bad={**src, "source_init": "mean_shape"})


# --------------------------------------------------------------------- shipped experiment files

def test_shipped_transfer_experiments_plan_the_studies(monkeypatch):
    monkeypatch.chdir(ROOT)                  # their config paths are relative to the project
    plan = build_plan(load_grid("experiments/transfer-in-domain.yaml"))
    cells = {c.init: c for c in plan.cells}
    assert len(plan.sources) == 4            # scratch / ImageNet -> spine, U-Net and U-Net++
    for init, cell in cells.items():
        arch = "smp_unetplusplus" if init.endswith("_unetpp") else "smp_unet"
        assert cell.config.model.arch == arch and cell.eval_split == "test1"
        if "spine" in init:
            source = cell.source.config
            assert source.data.dataset == "aasce_spine" and source.fewshot.budget is None
            assert source.model.arch == arch
            assert source.model.init == ("imagenet" if init.startswith("imagenet") else "scratch")
            assert cell.config.model.init == "regressor"
        else:
            assert cell.source is None
    cross = build_plan(load_grid("experiments/transfer-cross-anatomy.yaml"))
    pre = {c.init: c.pretraining.config for c in cross.cells if c.pretraining}
    chest, isbi = pre["ddpm_chest"].unlabeled, pre["ddpm_isbi"].unlabeled
    assert [p.name for p in chest.pools] == ["chest"] and not chest.labelled_splits
    assert not isbi.pools and isbi.labelled_splits == ["train"]
    assert any(e.startswith("isbi2015:test1") for e in isbi.exclude)
    assert pre["ddpm_chest"].train.max_steps == pre["ddpm_isbi"].train.max_steps   # equal compute


def test_checkpoint_init_takes_a_saved_regressor_and_a_unique_glob(tmp_path, roots):
    # A fine-tuned regressor on disk (a source of another grid, say) as a `checkpoint` init:
    # its body with a new head in its own architecture; a glob stands for the hashed folder.
    saved = tmp_path / "other_grid" / "sources" / "six-1a2b3c4d" / "best"
    save_regressor(build_regressor(RegressorConfig(arch="smp_unetplusplus", init="scratch",
                                                   encoder="resnet18", gray_adapter="colorize"),
                                   6, 64), saved)
    pattern = str(tmp_path / "other_grid" / "sources" / "six-*" / "best")
    path = experiment(tmp_path, roots, {"six": {"kind": "checkpoint", "checkpoint": pattern}},
                      budgets=[4])
    (cell,) = build_plan(load_grid(path)).cells
    model = cell.config.model
    assert (model.init, model.pretrained_path) == ("regressor", str(saved))
    assert (model.arch, model.encoder, model.gray_adapter) == \
        ("smp_unetplusplus", "resnet18", "colorize")

    # a glob must name one folder: none (the grid that makes it has not run) or two are errors
    for name in ("seven-*", "*"):
        if name == "*":
            (tmp_path / "other_grid" / "sources" / "seven-00000000" / "best").mkdir(parents=True)
        spec = yaml.safe_load(path.read_text())
        spec["inits"]["six"]["checkpoint"] = str(tmp_path / "other_grid" / "sources" / name /
                                                 "best")
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match="must match exactly one folder") as err:
            build_plan(load_grid(path))
        assert ("nothing" in str(err.value)) == (name == "seven-*")
