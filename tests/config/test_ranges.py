"""Config ranges (config/ranges.py): every numeric field declares one, defaults satisfy them,
and the loader refuses values outside them naming the dotted key and the range."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from ddpm_landmarks.config import classify, common, finetune, pretrain, training
from ddpm_landmarks.config.classify import ClassifyConfig
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.ranges import RANGE_KEY, check_ranges, parse_range
from ddpm_landmarks.config.schema import load_config
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.experiments import grid_schema
from ddpm_landmarks.studies import source_ranking

CONFIG_MODULES = (common, training, finetune, pretrain, classify, grid_schema, source_ranking)


def config_classes() -> list[type]:
    """The dataclasses of the config modules (source_ranking: its RankConfig, read from
    `rank.*` overrides; its result rows are not configs)."""
    return [obj for module in CONFIG_MODULES for obj in vars(module).values()
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
            and (module is not source_ranking or obj is source_ranking.RankConfig)]


def holds_number(tp) -> bool:
    """Whether an annotation is, or contains (Optional, list, tuple, dict values), int / float."""
    if tp in (int, float):
        return True
    return any(holds_number(arg) for arg in typing.get_args(tp) if arg is not Ellipsis)


def test_every_numeric_field_declares_a_range():
    missing = []
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if holds_number(hints[f.name]) and RANGE_KEY not in f.metadata:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"numeric config fields without a range: {missing}"


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_defaults_satisfy_their_ranges(cls):
    check_ranges(cls())


@pytest.mark.parametrize("spec, inside, outside", [
    ("> 0", [1e-9, 5, 1e6], [0, -1, math.inf, math.nan]),
    (">= 1", [1, 2], [0, 0.5, math.inf]),
    ("[0, 1]", [0, 0.5, 1], [-1e-9, 1.0001, math.nan]),
    ("(0, 1)", [0.5], [0, 1]),
    ("[0, 1)", [0, 0.999], [1]),
    ("{1, 3}", [1, 3], [2, 0]),
    ("any", [-math.inf, 0, math.inf], [math.nan]),
])
def test_range_notation(spec, inside, outside):
    allowed = parse_range(spec)
    assert all(allowed.contains(x) for x in inside)
    assert not any(allowed.contains(x) for x in outside)


def test_unparseable_range_is_a_programming_error():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_range("positive")


@pytest.mark.parametrize("cls, override, message", [
    (FinetuneConfig, "train.batch_size=0",
     r"train\.batch_size: 0 is outside the allowed range >= 1"),
    (FinetuneConfig, "heatmap.sigma=0", r"heatmap\.sigma: 0\.0 is outside the allowed range > 0"),
    (FinetuneConfig, "data.image_size=-64", r"data\.image_size: -64 .* >= 1"),
    (FinetuneConfig, "augment.flip_prob=1.5", r"augment\.flip_prob: 1\.5 .* \[0, 1\]"),
    (FinetuneConfig, "augment.scale=[1.2, 0.8]", r"augment\.scale: \[1\.2, 0\.8\] must be ordered"),
    (FinetuneConfig, "augment.gamma=[0, 1]", r"augment\.gamma\[0\]: 0\.0 .* > 0"),
    (FinetuneConfig, "optim.lr=-1e-4", r"optim\.lr: -0\.0001 .* > 0"),
    (FinetuneConfig, "optim.betas=[0.9, 1.0]", r"optim\.betas\[1\]: 1\.0 .* \[0, 1\)"),
    (FinetuneConfig, "eval.sdr_thresholds=[2, -1]", r"eval\.sdr_thresholds\[1\]: -1\.0"),
    (FinetuneConfig, "fewshot.seed=-1", r"fewshot\.seed: -1 .* >= 0"),
    (FinetuneConfig, "heatmap.sigma=.inf", r"heatmap\.sigma: inf is outside"),
    (FinetuneConfig, "loss.foreground_weight=.nan", r"loss\.foreground_weight: nan is outside"),
    (PretrainConfig, "diffusion.beta_start=0.5", r"diffusion\.beta_start: 0\.5 is above beta_end"),
    (PretrainConfig, "ssl.in_channels=2", r"ssl\.in_channels: 2 .* \{1, 3\}"),
    (PretrainConfig, "unlabeled.labelled_splits=[train, test1]",
     r"unlabeled\.labelled_splits: .* data\.eval_split 'test1'"),
    (PretrainConfig, "curriculum.stages=[{pools: {chest: 0}}]",
     r"curriculum\.stages\[0\]\.pools\.chest: 0"),
    (ClassifyConfig, "model.dropout=1", r"model\.dropout: 1\.0 .* \[0, 1\)"),
    (ClassifyConfig, "loss.class_weights=[1, 0]", r"loss\.class_weights\[1\]: 0\.0"),
])
def test_loader_refuses_values_outside_their_range(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], cls=cls)


def test_smp_architecture_needs_a_multiple_of_32():
    load_config(None, ["model.arch=smp_unet", "data.image_size=64"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match=r"data\.image_size: 48 is not a multiple of 32"):
        load_config(None, ["model.arch=smp_unetplusplus", "data.image_size=48"],
                    cls=FinetuneConfig)


def test_shared_refinement_patches_need_visible_supervision_and_fit_the_patch():
    on = ["refine.enabled=true", "refine.patch_size=32", "refine.share_radius=8"]
    load_config(None, on + ["refine.supervise=visible"], cls=FinetuneConfig)
    load_config(None, ["refine.share_radius=8"], cls=FinetuneConfig)     # refinement off
    with pytest.raises(ConfigError, match=r"refine\.share_radius: 8 .*refine\.supervise=visible"
                                          r" \(here channels / own\)"):
        load_config(None, on, cls=FinetuneConfig)
    with pytest.raises(ConfigError, match=r"refine\.share_radius: 16 .*at most 15\.5"):
        load_config(None, on + ["refine.supervise=visible", "refine.share_radius=16"],
                    cls=FinetuneConfig)


def test_experiment_file_values_are_range_checked(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("datasets: {synthetic: {}}\ninits: {scratch: {}}\n"
                    "budgets: [0]\n")
    with pytest.raises(ConfigError, match=r"budgets\[0\]: 0 is outside the allowed range >= 1"):
        grid_schema.load_grid(path)
    with pytest.raises(ConfigError, match=r"launcher\.num_processes: 0"):
        grid_schema.load_grid(path, ["budgets=[null]", "launcher.num_processes=0"])
