"""Source ranking before fine-tuning (`rank-sources`): the anatomy registry and filters, the
ordering, grid validation (Spearman against hand values), CLI errors, and end to end on the
synthetic set: a short DDPM pretraining on the target's images scores above a random init of
the same U-Net, deterministically; regressor candidates get their label-map SSIM."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddpm_landmarks.cli.main import main as cli_main
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config, to_dict
from ddpm_landmarks.studies.ranking_validation import validate_ranking
from ddpm_landmarks.studies.source_candidates import (
    Source,
    anatomy_match,
    identify_candidate,
    pool_anatomy,
    pretraining_sources,
    regressor_sources,
)
from ddpm_landmarks.studies.source_ranking import (
    RankConfig,
    RankResult,
    RankRow,
    order_rows,
    rank_sources,
)
from ddpm_landmarks.training.engine import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune" / "synthetic.yaml"
PRETRAIN = ROOT / "configs" / "pretrain" / "synthetic.yaml"


# ----------------------------------------------------------------------------------------------
# Anatomy filter, ordering
# ----------------------------------------------------------------------------------------------

def test_anatomy_registry_and_match():
    assert pool_anatomy("chest", "${DDPM_LANDMARKS_DATA}/chest_unlabeled") == "chest"
    assert pool_anatomy("", "/data/aasce2019_spine/images") == "spine"
    assert pool_anatomy("mine", "/data/xrays") == "unknown"            # no keyword: no guess
    assert pool_anatomy("", "/data/chest_and_hand") == "unknown"       # two anatomies: no guess
    config = {"data": {"dataset": "isbi2015"},
              "unlabeled": {"labelled_splits": ["train"],
                            "pools": [{"path": "/d/chest_unlabeled", "name": "chest"},
                                      {"path": "/d/aasce2019_spine/images", "name": "spine"}]}}
    sources = pretraining_sources(config)
    assert [(s.name, s.anatomy) for s in sources] == [
        ("isbi2015:train", "skull"), ("pool chest", "chest"), ("pool spine", "spine")]
    assert anatomy_match("skull", sources) == "yes"
    assert anatomy_match("hand", sources) == "no"
    assert anatomy_match("hand", sources + [Source("pool x", "unknown")]) == "unknown"
    assert anatomy_match("unknown", sources) == "unknown"
    assert anatomy_match("skull", []) == "n/a"
    assert pretraining_sources({})[0].anatomy == "unknown"
    tuned = regressor_sources({"data": {"dataset": "hand_dha", "train_split": "cv1_train"},
                               "model": {"init": "imagenet"}})
    assert [(s.anatomy, s.labelled) for s in tuned] == [("hand", True), ("natural images", False)]
    lost = regressor_sources({"data": {"dataset": "aasce_spine"},
                              "model": {"init": "pretrained", "pretrained_path": "/nowhere"}})
    assert [s.anatomy for s in lost] == ["spine", "unknown"]


def _row(name: str, match: str, score: float, label: float | None = None) -> RankRow:
    return RankRow(candidate=name, kind="k", detail="d", anatomy="a", match=match,
                   trained_on="", label_ssim=label, score=score, key=name)


def test_filters_come_before_the_score():
    rows = [_row("no", "no", 10.0), _row("yes", "yes", 1.0), _row("unk", "unknown", 5.0),
            _row("rand", "n/a", 0.5), _row("lowssim", "yes", 3.0, label=0.2),
            _row("nan", "yes", float("nan"))]
    ordered = order_rows(rows, RankConfig(min_label_ssim=0.5))
    assert [r.candidate for r in ordered] == ["yes", "rand", "nan", "lowssim", "unk", "no"]
    assert [r.rank for r in ordered] == [1, 2, 3, 4, 5, 6]
    excluded = order_rows(rows, RankConfig(min_label_ssim=0.5, filtered="exclude"))
    assert {r.candidate: r.rank for r in excluded} == {"yes": 1, "rand": 2, "nan": 3,
                                                      "lowssim": None, "unk": 4, "no": None}
    assert order_rows(rows, RankConfig())[0].candidate == "lowssim"     # no SSIM threshold


# ----------------------------------------------------------------------------------------------
# Validation against a grid
# ----------------------------------------------------------------------------------------------

def _cell(grid: Path, name: str, model: dict, mre, dataset="synthetic", budget=20,
          status="done", kind="ddpm") -> None:
    folder = grid / "cells" / name
    folder.mkdir(parents=True)
    (folder / "cell.json").write_text(json.dumps({
        "dataset": dataset, "init": kind, "budget": budget, "seed": 0, "name": name,
        "kind": kind, "status": status, "metrics": {"mre": mre, "unit": "mm"}}))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": dataset}, "fewshot": {"budget": budget}, "model": model}))


def test_validation_matches_cells_to_candidates_and_reports_spearman(tmp_path):
    export = tmp_path / "pre" / "export"
    export.mkdir(parents=True)
    grid = tmp_path / "grid"
    _cell(grid, "ddpm-s0", {"init": "pretrained", "pretrained_path": str(export)}, 1.0)
    _cell(grid, "ddpm-s1", {"init": "pretrained", "pretrained_path": str(export)}, 1.2)
    _cell(grid, "scratch-s0", {"init": "scratch", "arch": "ddpm_unet", "preset": "tiny",
                               "pretrained_path": ""}, 2.0, kind="scratch")
    _cell(grid, "smp-s0", {"init": "scratch", "arch": "smp_unet", "encoder": "resnet18"}, 1.5,
          kind="scratch")
    _cell(grid, "mean", {"init": "pretrained", "pretrained_path": str(export)}, 5.0,
          kind="mean_shape")
    _cell(grid, "other-data", {"init": "pretrained", "pretrained_path": str(export)}, 9.0,
          dataset="isbi2015")
    _cell(grid, "other-budget", {"init": "pretrained", "pretrained_path": str(export)}, 9.0,
          budget=5)
    _cell(grid, "running", {"init": "pretrained", "pretrained_path": str(export)}, None,
          status="running")
    rows = [_row("export", "yes", 3.0), _row("random:ddpm_unet:tiny", "n/a", 2.0),
            _row("random:smp_encoder:resnet18", "n/a", 1.0)]
    rows[0].key = f"path:{export.resolve()}"
    result = RankResult(target="t", target_anatomy="synthetic", score_name="LogME",
                        rows=order_rows(rows, RankConfig()), settings={}, seconds=0.0)
    cfg = load_config(FINETUNE, ["fewshot.budget=20"], cls=FinetuneConfig)
    other = tmp_path / "grid2"                         # another protocol: 3 mm for the export
    _cell(other, "ddpm-s0", {"init": "pretrained", "pretrained_path": str(export)}, 3.0)
    v = validate_ranking(result, cfg, [grid, other])
    one = v.grids["grid"]
    assert {r.candidate: (round(r.mre, 6), len(r.cells)) for r in one.rows} == {
        "export": (1.1, 2), "random:ddpm_unet:tiny": (2.0, 1),
        "random:smp_encoder:resnet18": (1.5, 1)}
    # scores 3, 2, 1 (ranks 3, 2, 1) vs MRE 1.1, 2.0, 1.5 (ranks 1, 3, 2): rho = -1 / 2.
    assert one.n == 3 and one.rho == pytest.approx(-0.5) and one.top1 is True
    # the 3! = 6 pairings of 3 values give rho = +-1, +-0.5, +-0.5: every one has |rho| >= 0.5,
    # so 3 candidates can never be significant
    assert one.p == 1.0
    # the final ranking is by score here (no candidate fails a filter): the same rho
    assert one.n_ranked == 3 and one.rho_rank == pytest.approx(one.rho)
    assert v.grids["grid2"].n == 1 and math.isnan(v.grids["grid2"].rho)
    # Pooled: export (1.0 + 1.2 + 3.0) / 3 = 1.733 -> MRE ranks 2, 3, 1: rho = +1 / 2.
    assert v.pooled.rows[1].candidate == "export" and v.pooled.rows[1].mre == pytest.approx(5.2 / 3)
    assert v.pooled.rho == pytest.approx(0.5) and v.pooled.top1 is False
    assert sum(v.skipped.values()) == 4


# ----------------------------------------------------------------------------------------------
# End to end on the synthetic set
# ----------------------------------------------------------------------------------------------


SYNTH = {"data.synthetic_num_images": 48, "data.synthetic_image_size": 64,
         "data.synthetic_num_landmarks": 8, "data.image_size": 64}


def _target_overrides(root: Path) -> list[str]:
    values = {**SYNTH, "data.root": root, "fewshot.budget": 20}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, export of a 60-step tiny DDPM pretraining on the target's train split).

    Measured on this task (20 images, rank.seed 0): LogME 1.301 after 60 steps against 1.277
    for its own initial weights (= random:ddpm_unet:tiny at seed 0: both seeded with 0) and
    1.235-1.265 for random inits of seeds 1-6. After 30 steps the gap to its init is +0.009:
    behind the 20-step lr warm-up the weights have hardly moved yet."""
    from ddpm_landmarks.pretrain import pretrain
    root = tmp_path_factory.mktemp("synthetic")
    runs = tmp_path_factory.mktemp("runs")
    values = {**SYNTH, "data.root": root, "train.max_steps": 60, "train.batch_size": 16,
              "train.num_workers": 0, "train.checkpoint_every": 0, "train.image_every": 0,
              "train.log_every": 20, "run.output_dir": runs, "run.name": "pre"}
    reset_accelerate_state()
    pretrain(load_config(PRETRAIN, [f"{k}={v}" for k, v in values.items()], cls=PretrainConfig))
    reset_accelerate_state()
    return root, runs / "pre" / "export"


def test_pretrained_on_the_target_scores_above_random_init_deterministically(pretrained):
    root, export = pretrained
    cfg = load_config(FINETUNE, _target_overrides(root), cls=FinetuneConfig)
    specs = [str(export), "random:ddpm_unet:tiny"]
    first = rank_sources(cfg, RankConfig(), specs)
    second = rank_sources(cfg, RankConfig(), specs)
    by_name = {r.candidate: r for r in first.rows}
    assert by_name[str(export)].score > by_name["random:ddpm_unet:tiny"].score
    assert [r.candidate for r in first.rows] == specs                  # rank 1 = pretrained
    assert by_name[str(export)].match == "yes" and by_name[str(export)].anatomy == "synthetic"
    assert by_name["random:ddpm_unet:tiny"].match == "n/a"
    for a, b in zip(first.rows, second.rows):
        assert a.score == b.score
        assert [p["evidence"] for p in a.details["per_landmark"]] == \
            [p["evidence"] for p in b.details["per_landmark"]]


def test_regressor_candidate_label_map_ssim_and_anatomy_filter(pretrained, tmp_path):
    from ddpm_landmarks.config.finetune import RegressorConfig
    from ddpm_landmarks.models.registry import build_regressor
    from ddpm_landmarks.models.saved_regressor import save_regressor
    root, export = pretrained
    target = load_config(FINETUNE, _target_overrides(root), cls=FinetuneConfig)
    model = build_regressor(RegressorConfig(init="pretrained", pretrained_path=str(export)),
                            8, 64)
    same = to_dict(target)
    same["model"]["pretrained_path"] = str(export)
    save_regressor(model, tmp_path / "same", config=same)               # the target's own draw
    other_draw = to_dict(target)
    other_draw["fewshot"]["draw"] = 1
    save_regressor(model, tmp_path / "draw1", config=other_draw)
    spine = to_dict(target)
    spine["data"].update(dataset="aasce_spine", root=str(tmp_path / "no_spine_here"))
    spine["model"]["pretrained_path"] = ""
    save_regressor(model, tmp_path / "spine", config=spine)
    candidate = identify_candidate(str(tmp_path / "same"))
    assert candidate.kind == "regressor"
    assert [s.anatomy for s in candidate.sources] == ["synthetic", "synthetic"]
    rows = {r.candidate: r for r in rank_sources(
        target, RankConfig(filtered="exclude"),
        [str(tmp_path / n) for n in ("same", "draw1", "spine")]).rows}
    assert rows[str(tmp_path / "same")].label_ssim == pytest.approx(1.0)
    assert 0.5 < rows[str(tmp_path / "draw1")].label_ssim < 1.0
    spine_row = rows[str(tmp_path / "spine")]
    assert spine_row.match == "no" and spine_row.rank is None and spine_row.label_ssim is None
    assert "source labels unavailable" in " ".join(spine_row.notes)
    # Same body, same task: the three regressors score alike.
    assert rows[str(tmp_path / "same")].score == rows[str(tmp_path / "spine")].score
    hs = rank_sources(target, RankConfig(score="hscore"), [str(tmp_path / "same")]).rows[0]
    assert math.isfinite(hs.score) and hs.score > 0 and hs.details["classes"] == 9


def test_cli_writes_the_ranking_and_the_validation(pretrained, tmp_path, capsys):
    root, export = pretrained
    grid = tmp_path / "grid"
    _cell(grid, "ddpm-s0", {"init": "pretrained", "pretrained_path": str(export)}, 1.0)
    _cell(grid, "scratch-s0", {"init": "scratch", "arch": "ddpm_unet", "preset": "tiny"}, 2.0,
          kind="scratch")
    out = tmp_path / "out"
    code = cli_main(["rank-sources", "--target", str(FINETUNE), "--candidates", str(export),
                     "random:ddpm_unet:tiny", *_target_overrides(root), "rank.feature_size=32",
                     "--out", str(out), "--validate", str(grid)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| rank | candidate |" in printed and "Spearman rho" in printed
    with open(out / "ranking.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["rank"], r["candidate"]) for r in table] == [("1", str(export)),
                                                            ("2", "random:ddpm_unet:tiny")]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rank"]["feature_size"] == 32 and saved["target_config"]["fewshot"]["budget"] == 20
    assert "rho" in (out / "validation.md").read_text()
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["candidates"][0]["details"]["per_landmark"]) == 8


def test_cli_errors(tmp_path, capsys):
    target = ["rank-sources", "--target", str(FINETUNE), "--out", str(tmp_path / "o")]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "export").mkdir()
    (tmp_path / "junk" / "export" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    cases = [
        (["--candidates", str(tmp_path / "missing")], "no such file or folder"),
        (["--candidates", str(tmp_path / "junk")], "did you mean"),
        (["--candidates", "random:vit"], "random:ddpm_unet[:PRESET]"),
        (["--candidates", "random:ddpm_unet:huge"], "unknown U-Net preset"),
        (["--candidates", "random:ddpm_unet", "rank.bogus=1"], "unknown config key 'rank.bogus'"),
        (["--candidates", "random:ddpm_unet", "rank.background_ratio=-1"], "background_ratio"),
        (["--candidates", "random:ddpm_unet", "--validate", str(tmp_path)], "not a grid folder"),
        (["--candidates", "random:ddpm_unet", "random:ddpm_unet:tiny"], "named twice"),
    ]
    for extra, message in cases:
        assert cli_main(target + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_permutation_p_by_enumeration():
    from itertools import permutations

    from ddpm_landmarks.studies.ranking_validation import permutation_p
    from ddpm_landmarks.studies.transferability import spearman
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [1.2, 1.1, 2.5, 3.0, 4.0]      # rho = 0.9
    exact = np.mean([abs(spearman(x, list(p))) >= 0.9 - 1e-12 for p in permutations(y)])
    # |rho| >= 0.9 <=> sum d^2 <= 2 or >= 38: the identity and the 4 adjacent swaps, and the
    # reverses of those 5
    assert exact == pytest.approx(10 / 120)
    assert permutation_p(x, y, permutations=20000) == pytest.approx(exact, abs=0.01)
    assert permutation_p(x, y) == permutation_p(x, y)                      # seeded
