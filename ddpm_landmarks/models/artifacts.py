"""Which saved thing a folder is: the one place that knows the folder formats.

After diffusers' `save_pretrained` / `from_pretrained`: a saved model is a folder with its
weights (safetensors), a JSON file that says what it is (a `format` field and a version) and
the resolved run config that produced it. Every writer and reader of the package goes through
this table; every command that takes a path asks `identify` / `read_meta` / `weights_folder`,
so an error says what the folder is instead and what to pass.

    kind         metadata file    format field                     written by
    ddpm_unet    config.json      _class_name = "UNet2DModel"      methods/ddpm.py (diffusers)
    ssl_encoder  encoder.json     "ddpm_landmarks.ssl_encoder" v1  methods/ssl_base.py
    regressor    regressor.json   "ddpm_landmarks.regressor" v1    models/saved_regressor.py
    classifier   classifier.json  "ddpm_landmarks.classifier" v1   models/classifier.py
    run          best/ or export/ holding one of the above (a training run folder)

JSON and YAML only: nothing here unpickles or imports torch. Loading the weights is the job of
each kind's module (models/saved_regressor.py, models/classifier.py, models/encoder_weights.py,
methods/ddpm.py); `models.registry.load_saved` loads any kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

RUN_CONFIG = "config.yaml"           # a run folder's resolved config
RUN_WEIGHTS = ("best", "export")     # a run folder's saved models, preferred first


@dataclass(frozen=True)
class Format:
    kind: str
    meta_file: str                   # the JSON that identifies the folder
    format: str                      # value of its format field
    format_field: str = "format"
    version: Optional[int] = 1       # None: the format has no version of ours (diffusers)
    weights_file: str = ""
    config_file: str = "config.yaml"  # the resolved run config saved next to the weights
    required: tuple[str, ...] = ()   # other fields a valid file has
    description: str = ""


FORMATS: dict[str, Format] = {
    "ddpm_unet": Format("ddpm_unet", "config.json", "UNet2DModel", "_class_name", None,
                        "diffusion_pytorch_model.safetensors", "ddpm_landmarks_config.yaml",
                        description="a DDPM pretraining export"),
    "ssl_encoder": Format("ssl_encoder", "encoder.json", "ddpm_landmarks.ssl_encoder",
                          weights_file="encoder.safetensors", required=("encoder", "in_channels"),
                          description="an SSL encoder export"),
    "regressor": Format("regressor", "regressor.json", "ddpm_landmarks.regressor",
                        weights_file="regressor.safetensors",
                        required=("regressor", "num_landmarks"),
                        description="a saved landmark regressor"),
    "classifier": Format("classifier", "classifier.json", "ddpm_landmarks.classifier",
                         weights_file="classifier.safetensors",
                         required=("classifier", "classes", "encoder"),
                         description="a saved image classifier"),
}

# The run that writes each kind into its run folder's best/ and export/.
RUN_OF = {"ddpm_unet": "pretraining", "ssl_encoder": "pretraining", "regressor": "fine-tuning",
          "classifier": "classification"}

# What to do instead, when a folder of kind `found` was given where `wanted` is needed.
HINTS: dict[tuple[str, str], str] = {
    ("ssl_encoder", "ddpm_unet"): "use model.arch=smp_unet with the same encoder",
    ("ddpm_unet", "ssl_encoder"): "use model.arch=ddpm_unet",
    ("ddpm_unet", "regressor"): "use model.init=pretrained",
    ("ssl_encoder", "regressor"): "use model.init=pretrained with model.arch=smp_unet",
}


class ArtifactError(FileNotFoundError):
    """A path that is not the saved thing it should be; the message says what it is."""


def _load_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _kind_of_model_folder(folder: Path) -> Optional[str]:
    for fmt in FORMATS.values():
        meta_file = folder / fmt.meta_file
        if meta_file.is_file():
            meta = _load_json(meta_file)
            if meta is not None and meta.get(fmt.format_field) == fmt.format:
                return fmt.kind
    return None


def identify(path: str | Path) -> Optional[str]:
    """The kind of `path` (a FORMATS key, or "run"), None when it is none of them."""
    folder = Path(path)
    if not str(path) or not folder.is_dir():
        return None
    kind = _kind_of_model_folder(folder)
    if kind is not None:
        return kind
    if any(_kind_of_model_folder(folder / name) for name in RUN_WEIGHTS):
        return "run"
    return None


def describe(path: str | Path) -> str:
    """What `path` is, in words, for error messages."""
    folder = Path(path)
    if not str(path):
        return "an empty path"
    if not folder.exists():
        return "no such folder"
    kind = identify(folder)
    if kind == "run":
        inside = [k for name in RUN_WEIGHTS if (k := _kind_of_model_folder(folder / name))]
        names = " and ".join(f"{n}/" for n in RUN_WEIGHTS if _kind_of_model_folder(folder / n))
        return f"a {RUN_OF[inside[0]]} run folder ({names} hold {FORMATS[inside[0]].description})"
    if kind is not None:
        return FORMATS[kind].description
    return "none of the saved formats (" + ", ".join(
        f"{f.meta_file}: {f.description}" for f in FORMATS.values()) + ")"


def read_meta(path: str | Path, kind: str, what: str = "") -> dict:
    """The metadata file of a `kind` folder, checked (format field, version, required fields,
    weights present); ArtifactError saying what the folder is otherwise. `what` names the
    config key or argument the path came from, for the message."""
    fmt = FORMATS[kind]
    folder = Path(path)
    where = f"{what} {str(path)!r}" if what else repr(str(path))
    meta_file = folder / fmt.meta_file
    meta = _load_json(meta_file) if meta_file.is_file() else None
    if meta is None or meta.get(fmt.format_field) != fmt.format:
        found = identify(folder)
        hint = HINTS.get((found, kind), "")
        if found == "run":
            names = [str(folder / n) for n in RUN_WEIGHTS
                     if _kind_of_model_folder(folder / n) == kind]
            if names:
                raise ArtifactError(f"{where} is not {fmt.description} (no {fmt.meta_file}); "
                                    f"it is a {RUN_OF[kind]} run folder: pass "
                                    f"{' or '.join(names)}")
        if meta_file.is_file() and found is None:
            value = None if meta is None else meta.get(fmt.format_field)
            raise ValueError(f"{meta_file}: not {fmt.description} ({fmt.format_field} "
                             f"{value!r}, expected {fmt.format!r})")
        raise ArtifactError(f"{where} is not {fmt.description} (no {fmt.meta_file}); it is "
                            f"{describe(folder)}" + (f": {hint}" if hint else ""))
    if fmt.version is not None and meta.get("version") != fmt.version:
        raise ValueError(f"{meta_file}: unsupported version {meta.get('version')!r} of "
                         f"{fmt.format} (this code reads version {fmt.version})")
    missing = [k for k in fmt.required if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: no {', '.join(map(repr, missing))}")
    if fmt.weights_file and not (folder / fmt.weights_file).is_file():
        raise ArtifactError(f"{folder / fmt.weights_file}: missing ({fmt.description} without "
                            f"its weights)")
    return meta


def weights_folder(path: str | Path, kind: str, weights: str = "best",
                   what: str = "") -> Path:
    """The folder holding a saved `kind`: `path` itself when it is one, else, for a run folder,
    its `weights` subfolder ("best" falls back to "export": a run without validation has no
    best/). ArtifactError saying what was found otherwise."""
    folder = Path(path)
    if identify(folder) == kind:
        return folder
    names: Sequence[str] = [weights] + (["export"] if weights == "best" else [])
    for name in names:
        if identify(folder / name) == kind:
            return folder / name
    if (folder / RUN_CONFIG).is_file() and identify(folder) in (None, "run"):
        raise ArtifactError(f"{what + ' ' if what else ''}{str(folder)!r}: no trained model "
                            f"({' nor '.join(n + '/' for n in names)} holds "
                            f"{FORMATS[kind].description}); has the run finished?")
    read_meta(folder, kind, what)          # raises, saying what the folder is
    return folder


def write_meta(folder: Path, kind: str, meta: dict) -> Path:
    """Write `kind`'s metadata file into `folder` (format and version first)."""
    fmt = FORMATS[kind]
    head = {fmt.format_field: fmt.format}
    if fmt.version is not None:
        head["version"] = fmt.version
    path = Path(folder) / fmt.meta_file
    path.write_text(json.dumps({**head, **meta}, indent=2) + "\n")
    return path


def saved_config(folder: str | Path, kind: str) -> Optional[Path]:
    """The run config saved next to a `kind`'s weights, or with its run folder; None if none."""
    folder = Path(folder)
    for candidate in (folder / FORMATS[kind].config_file, folder.parent / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    return None
