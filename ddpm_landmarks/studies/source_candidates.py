"""Candidate pretrained checkpoints for `ddpm-landmarks rank-sources`: what each one is, how to
get its frozen features, and what it was trained on (for the anatomy filter and the label-map
similarity of studies/source_ranking.py).

    candidate = identify_candidate("runs/pretrain_isbi2015/export")
    features_fn = candidate.load(num_landmarks=19, image_size=64, seed=0, device="cpu")
    candidate.sources        # [Source("isbi2015:train", "skull", labelled=False), ...]

Kinds (a path must point at the folder holding the files):
  ddpm export   config.json of a UNet2DModel + its weights (methods/ddpm.py export); features:
                methods.ddpm.unet_decoder_features (decoder blocks at t = 0), as the probe;
  ssl export    encoder.json + encoder.safetensors (methods/ssl_base.py); loaded into the smp
                U-Net fine-tuning would build (models/smp_regressor.py: 1-channel exports with
                gray_adapter=in_channels, 3-channel ones with repeat, the export's input
                normalisation), features: its encoder's five stages;
  regressor     regressor.json (models/regressor.py save_regressor: a fine-tuning run's best/ or
                export/); the fine-tuned body's features (U-Net decoder at the regressor's
                timestep, or the smp encoder through the regressor's own gray adapter);
  random:ddpm_unet[:PRESET] (default tiny) / random:smp_encoder[:ENCODER] (default resnet18,
                1 channel): the architecture at a seeded random init, the no-transfer reference
                (the grid's `scratch` cells are its fine-tuned counterpart).

Anatomy registry (what a candidate saw): a dataset name maps through ANATOMY_OF_DATASET; an
unlabelled pool by the keywords of POOL_KEYWORDS in its name, else in its path (one anatomy
must match; none or several -> "unknown", never a guess). Sources of a pretraining export:
its config's `unlabeled.labelled_splits` of `data.dataset` and every `unlabeled.pools` entry;
of a regressor: its fine-tuning labels (`data.dataset`), plus what its `model.pretrained_path`
was trained on when that folder can be found (`imagenet` for ImageNet encoders).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.models.artifacts import identify, read_meta, saved_config

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]

ANATOMY_OF_DATASET = {"isbi2015": "skull", "hand_dha": "hand", "chest_gu2net": "chest",
                      "aasce_spine": "spine", "synthetic": "synthetic"}   # generic: unknown
# Keyword (lower case, substring) -> anatomy, for unlabelled pools named by users.
POOL_KEYWORDS = (("isbi", "skull"), ("ceph", "skull"), ("skull", "skull"), ("hand", "hand"),
                 ("chest", "chest"), ("cxr", "chest"), ("lung", "chest"), ("spine", "spine"),
                 ("aasce", "spine"), ("vertebra", "spine"), ("synthetic", "synthetic"))
UNKNOWN = "unknown"
RANDOM_DEFAULTS = {"ddpm_unet": "tiny", "smp_encoder": "resnet18"}
_CHAIN_DEPTH = 4                   # regressor -> regressor -> ... -> pretraining export


def dataset_anatomy(name: str) -> str:
    return ANATOMY_OF_DATASET.get(str(name), UNKNOWN)


def pool_anatomy(name: str, path: str) -> str:
    """The anatomy of an unlabelled pool from its name, else its path; "unknown" when no
    keyword or keywords of different anatomies match."""
    for text in (name, path):
        found = {anatomy for key, anatomy in POOL_KEYWORDS if key in str(text or "").lower()}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return UNKNOWN
    return UNKNOWN


@dataclass
class Source:
    name: str                      # e.g. "isbi2015:train", "pool chest", "imagenet"
    anatomy: str
    labelled: bool = False         # its landmark labels were trained on


def pretraining_sources(config: dict) -> list[Source]:
    """What a pretraining run (its saved config dict) trained on."""
    if not config:
        return [Source("(no config saved with the export)", UNKNOWN)]
    data = config.get("data") or {}
    unlabeled = config.get("unlabeled") or {}
    dataset = str(data.get("dataset", ""))
    sources = [Source(f"{dataset}:{split}", dataset_anatomy(dataset))
               for split in unlabeled.get("labelled_splits") or []]
    for pool in unlabeled.get("pools") or []:
        if pool.get("weight", 1.0) == 0:
            continue                       # never sampled
        name, path = str(pool.get("name") or ""), str(pool.get("path") or "")
        sources.append(Source(f"pool {name or path}", pool_anatomy(name, path)))
    return sources or [Source("(no pretraining images named in the config)", UNKNOWN)]


def regressor_sources(config: dict, depth: int = 0) -> list[Source]:
    """What a fine-tuned regressor (its saved FinetuneConfig dict) was trained on."""
    if not config:
        return [Source("(no config saved with the regressor)", UNKNOWN, labelled=True)]
    data = config.get("data") or {}
    dataset = str(data.get("dataset", ""))
    sources = [Source(f"{dataset}:{data.get('train_split', 'train')} labels",
                      dataset_anatomy(dataset), labelled=True)]
    model = config.get("model") or {}
    init, path = model.get("init"), str(model.get("pretrained_path") or "")
    if init == "imagenet":
        sources.append(Source("imagenet", "natural images"))
    elif init in ("pretrained", "regressor") and path:
        kind = identify(path)
        if depth < _CHAIN_DEPTH and kind == "regressor":
            sources += regressor_sources(_read_yaml(saved_config(path, kind)), depth + 1)
        elif kind in ("ddpm_unet", "ssl_encoder"):
            sources += pretraining_sources(_export_config(Path(path)))
        else:
            sources.append(Source(f"{path} (not found)", UNKNOWN))
    return sources


def _read_yaml(path: Optional[Path]) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return loaded if isinstance(loaded, dict) else {}


def _export_config(folder: Path) -> dict:
    """The run config saved with a DDPM or SSL export (models/artifacts.py saved_config)."""
    kind = identify(folder)
    config = saved_config(folder, kind) if kind in ("ddpm_unet", "ssl_encoder") else None
    return _read_yaml(config) if config is not None else {}


# ----------------------------------------------------------------------------------------------
# Feature functions
# ----------------------------------------------------------------------------------------------

def _smp_features(model: torch.nn.Module) -> FeatureFn:
    """An SmpRegressor's encoder stages, fed the way fine-tuning feeds them (gray adapter and
    input normalisation of the regressor: SmpRegressor.encoder_input)."""
    from ddpm_landmarks.methods.ssl_base import encoder_stage_features
    return lambda images: encoder_stage_features(model.encoder, model.encoder_input(images),
                                                 model.in_channels)


def _regressor_features(model: torch.nn.Module) -> FeatureFn:
    from ddpm_landmarks.methods.ddpm import unet_decoder_features
    from ddpm_landmarks.models.regressor import HeatmapRegressor
    if isinstance(model, HeatmapRegressor):
        return lambda images: unet_decoder_features(model.unet, images, model.cfg.timestep)
    return _smp_features(model)


@dataclass
class Candidate:
    spec: str                      # as given on the command line
    kind: str                      # ddpm export | ssl export | regressor | random
    detail: str                    # architecture / method, for the table
    path: Optional[Path] = None
    config: dict = field(default_factory=dict)   # the run config saved with it
    sources: list[Source] = field(default_factory=list)

    @property
    def key(self) -> str:
        """What grid cells are matched on: the resolved folder, or the random spec."""
        return f"path:{self.path.resolve()}" if self.path is not None else self.spec

    @property
    def labelled_config(self) -> Optional[dict]:
        """The fine-tuning config of its landmark labels (regressors), else None."""
        return self.config if self.kind == "regressor" and self.config else None

    def load(self, num_landmarks: int, image_size: int, seed: int,
             device: torch.device | str) -> FeatureFn:
        """The model on `device` in eval mode, as a function images -> feature maps."""
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))          # random inits (and nothing else) draw
                model, make_fn = self._build(num_landmarks, image_size)
        except (FileNotFoundError, ValueError, OSError, KeyError) as err:
            raise ConfigError(f"candidate {self.spec}: {err}") from None
        model = model.to(device).eval()
        fn = make_fn(model)
        return lambda images: fn(images.to(device))

    def _build(self, num_landmarks: int, image_size: int):
        from ddpm_landmarks.config.finetune import RegressorConfig
        from ddpm_landmarks.methods.ddpm import load_exported, unet_decoder_features
        from ddpm_landmarks.models.registry import build_regressor
        from ddpm_landmarks.models.saved_regressor import load_regressor
        if self.kind == "ddpm export":
            model = load_exported(self.path)[0]
            return model, lambda m: (lambda x: unet_decoder_features(m, x))
        if self.kind == "ssl export":
            meta = read_meta(self.path, "ssl_encoder", "candidate")
            cfg = RegressorConfig(arch="smp_unet", init="pretrained", encoder=meta["encoder"],
                                  pretrained_path=str(self.path),
                                  gray_adapter="in_channels" if meta["in_channels"] == 1
                                  else "repeat")
            return build_regressor(cfg, num_landmarks, image_size), _smp_features
        if self.kind == "regressor":
            return load_regressor(self.path), _regressor_features
        arch, name = self.detail.split(" ", 1)
        if arch == "ddpm_unet":
            from ddpm_landmarks.config.pretrain import ModelConfig
            from ddpm_landmarks.models.unet import build_unet
            model = build_unet(ModelConfig(preset=name), image_size=image_size)
            return model, lambda m: (lambda x: unet_decoder_features(m, x))
        cfg = RegressorConfig(arch="smp_unet", init="scratch", encoder=name,
                              gray_adapter="in_channels")
        return build_regressor(cfg, num_landmarks, image_size), _smp_features


def _random_candidate(spec: str) -> Candidate:
    parts = spec.split(":")
    arch = parts[1] if len(parts) > 1 else ""
    if arch not in RANDOM_DEFAULTS or len(parts) > 3:
        raise ConfigError(f"candidate {spec!r}: expected random:ddpm_unet[:PRESET] or "
                          f"random:smp_encoder[:ENCODER] (e.g. random:ddpm_unet:tiny)")
    name = parts[2] if len(parts) == 3 and parts[2] else RANDOM_DEFAULTS[arch]
    if arch == "ddpm_unet":
        from ddpm_landmarks.models.unet import PRESETS
        if name not in PRESETS:
            raise ConfigError(f"candidate {spec!r}: unknown U-Net preset {name!r}; valid: "
                              f"{', '.join(PRESETS)}")
    else:
        from ddpm_landmarks.models.smp_regressor import check_encoder_name
        try:
            check_encoder_name(name)
        except ValueError as err:
            raise ConfigError(f"candidate {spec!r}: {err}") from None
    return Candidate(spec=f"random:{arch}:{name}", kind="random", detail=f"{arch} {name}")


def identify_candidate(spec: str) -> Candidate:
    """The Candidate a command-line entry names; ConfigError when it is none of the kinds."""
    if spec.startswith("random:"):
        return _random_candidate(spec)
    folder = Path(spec)
    if not folder.exists():
        raise ConfigError(f"candidate {spec}: no such file or folder")
    kind = identify(folder)
    try:
        if kind == "regressor":
            config = _read_yaml(saved_config(folder, kind))
            arch = read_meta(folder, kind, "candidate")["regressor"]
            return Candidate(spec, "regressor", f"{arch.get('arch', '?')} fine-tuned", folder,
                             config, regressor_sources(config))
        if kind == "ssl_encoder":
            meta = read_meta(folder, kind, "candidate")
            config = _export_config(folder)
            return Candidate(spec, "ssl export", f"{meta.get('method', '?')} "
                             f"{meta['encoder']} ({meta['in_channels']} ch)", folder, config,
                             pretraining_sources(config))
        if kind == "ddpm_unet":
            config = _export_config(folder)
            preset = (config.get("model") or {}).get("preset", "?")
            return Candidate(spec, "ddpm export", f"UNet2DModel {preset}", folder, config,
                             pretraining_sources(config))
    except (OSError, ValueError) as err:
        raise ConfigError(f"candidate {spec}: {err}") from None
    inside = [str(folder / sub) for sub in ("export", "best")
              if identify(folder / sub) in ("regressor", "ssl_encoder", "ddpm_unet")]
    hint = f"; did you mean {' or '.join(inside)}?" if inside else ""
    raise ConfigError(f"candidate {spec}: not a pretrained checkpoint: expected a DDPM export "
                      f"(config.json of a UNet2DModel), an SSL encoder export (encoder.json + "
                      f"encoder.safetensors), a fine-tuned regressor (regressor.json) or "
                      f"random:ddpm_unet[:PRESET] / random:smp_encoder[:ENCODER]{hint}")


def anatomy_match(target: str, sources: list[Source]) -> str:
    """yes: the candidate saw the target's anatomy; no: it saw only other, known anatomies;
    unknown: the target's or a source's anatomy is unknown; n/a: no training data (random)."""
    if not sources:
        return "n/a"
    if target == UNKNOWN:
        return UNKNOWN
    anatomies = {s.anatomy for s in sources}
    if target in anatomies:
        return "yes"
    return UNKNOWN if UNKNOWN in anatomies else "no"


def anatomy_text(sources: list[Source]) -> str:
    if not sources:
        return "none (random init)"
    return "+".join(dict.fromkeys(s.anatomy for s in sources))


def describe_sources(sources: list[Source]) -> str:
    return "; ".join(f"{s.name} ({s.anatomy}{', labels' if s.labelled else ''})"
                     for s in sources) or "-"


__all__ = ["ANATOMY_OF_DATASET", "POOL_KEYWORDS", "Candidate", "Source", "anatomy_match",
           "anatomy_text", "dataset_anatomy", "describe_sources", "identify_candidate",
           "pool_anatomy", "pretraining_sources", "regressor_sources"]
