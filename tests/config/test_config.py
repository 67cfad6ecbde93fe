"""Configs: YAML + dotted overrides into typed dataclasses, with errors that name the key."""
from pathlib import Path

import pytest
import yaml

from ddpm_landmarks.config.classify import ClassifyConfig
from ddpm_landmarks.config.common import ExperimentConfig
from ddpm_landmarks.config.finetune import FinetuneConfig
from ddpm_landmarks.config.pretrain import PretrainConfig
from ddpm_landmarks.config.schema import load_config, save_config, to_dict
from ddpm_landmarks.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
# Each config folder and the class its files are read as (a new folder is added here).
CONFIG_CLASSES = {".": ExperimentConfig, "pretrain": PretrainConfig,
                  "finetune": FinetuneConfig, "finetune/baselines": FinetuneConfig,
                  "classify": ClassifyConfig}
CONFIGS = [pytest.param(path, cls, id=path.relative_to(CONFIG_ROOT).as_posix())
           for folder, cls in CONFIG_CLASSES.items()
           for path in sorted((CONFIG_ROOT / folder).glob("*.yaml"))]


@pytest.mark.parametrize("path, cls", CONFIGS)
def test_every_shipped_config_loads(path, cls):
    cfg = load_config(path, cls=cls)
    assert isinstance(cfg, cls)


# An image of a split we report on must never be pretrained on: a pool holding a dataset's
# images needs the exclusion rule of its test split.
TEST_SPLIT_RULES = {"aasce2019_spine": "aasce_spine:test@", "isbi2015": "isbi2015:test1@"}


@pytest.mark.parametrize("path", sorted((CONFIG_ROOT / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_pretrain_pools_exclude_the_test_splits(path):
    cfg = load_config(path, cls=PretrainConfig)
    for pool in cfg.unlabeled.pools:
        for folder, rule in TEST_SPLIT_RULES.items():
            if f"/{folder}" in pool.path:
                assert any(e.startswith(rule) for e in cfg.unlabeled.exclude), \
                    f"{path.name}: pool {pool.path} without an exclusion '{rule}...'"


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["data.image_size=64", "augment.scale=[0.8, 1.2]", "fewshot.budget=5",
                             "eval.sdr_thresholds=[2, 4, 10]", "eval.sdr_inclusive=false",
                             "data.resize_mode=letterbox"])
    assert cfg.data.image_size == 64
    assert cfg.augment.scale == (0.8, 1.2)                 # list -> the declared tuple
    assert cfg.fewshot.budget == 5
    assert cfg.eval.sdr_thresholds == [2.0, 4.0, 10.0]     # ints -> floats
    assert all(isinstance(t, float) for t in cfg.eval.sdr_thresholds)
    assert cfg.eval.sdr_inclusive is False
    assert cfg.data.resize_mode == "letterbox"


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 128\n  dataset: synthetic\n")
    cfg = load_config(path, ["data.image_size=32"])
    assert cfg.data.image_size == 32 and cfg.data.dataset == "synthetic"


def test_unknown_key_names_key_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.imagesize=3"])
    assert "data.imagesize" in str(err.value) and "image_size" in str(err.value)

    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trian" in msg and "data" in msg and "fewshot" in msg and str(path) in msg


@pytest.mark.parametrize("override, fragment", [
    ("data.image_size=abc", "data.image_size"),
    ("data.image_size=1.5", "data.image_size"),
    ("data.image_size=true", "data.image_size"),       # bool is not an int here
    ("data.resize_mode=squash", "stretch"),             # lists the allowed values
    ("augment.scale=[1, 2, 3]", "augment.scale"),
    ("eval.sdr_thresholds=[2, x]", "eval.sdr_thresholds[1]"),
    ("data=3", "data"),
    ("data.image_size.x=3", "data.image_size"),
    ("data.image_size", "section.key=value"),
])
def test_wrong_values_are_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_optional_accepts_null():
    cfg = load_config(None, ["fewshot.budget=null", "data.num_landmarks=19"])
    assert cfg.fewshot.budget is None and cfg.data.num_landmarks == 19


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.image_size=96", "augment.gamma=[0.7, 1.4]",
                             "unlabeled.exclude=[isbi2015:test1]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["data"]["image_size"] == 96
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert not list(path.parent.glob(".*.tmp"))          # no temporary left behind


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_yaml_bare_no_is_the_string_no_for_string_choices():
    from ddpm_landmarks.config.pretrain import PretrainConfig
    cfg = load_config(None, ["train.mixed_precision=no"], cls=PretrainConfig)
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="bf16"):
        load_config(None, ["train.mixed_precision=yes"], cls=PretrainConfig)


def test_exponent_floats_without_a_dot():
    """YAML 1.1 reads `1e-4` as a string; a float field still takes it (and only it)."""
    from ddpm_landmarks.config.finetune import FinetuneConfig
    cfg = load_config(None, ["optim.lr=1e-4", "optim.head_lr=2E-3", "loss.foreground_weight=1e1"],
                      cls=FinetuneConfig)
    assert (cfg.optim.lr, cfg.optim.head_lr, cfg.loss.foreground_weight) == (1e-4, 2e-3, 10.0)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=1e3"], cls=FinetuneConfig)
