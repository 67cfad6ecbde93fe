"""Typed configs from YAML: dataclasses <- YAML file <- dotted command-line overrides.

    cfg = load_config("configs/isbi2015.yaml", ["data.image_size=256", "fewshot.budget=25"])
    save_config(cfg, run_dir / "config.yaml")

Every key is checked against the dataclass fields: an unknown key, or a value of the wrong
type, raises ConfigError naming the dotted key and listing the valid ones. Nothing is coerced
silently except the two conversions YAML cannot express (int -> float, list -> tuple).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ddpm_landmarks.config.common import ExperimentConfig
from ddpm_landmarks.errors import ConfigError
from ddpm_landmarks.utils.atomic import atomic_write_text

# ----------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with checks
# ----------------------------------------------------------------------------------------------

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (int->float, list->tuple allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:            # Optional[X]: X's own, more precise, error
            return _convert(value, options[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        # YAML 1.1 reads a bare `no` / `off` as False (`mixed_precision=no`): map it back to
        # the literal the user typed when the field only takes strings.
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = {False: "no", True: "yes"}[value]
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is list:
            (item_tp,) = args or (Any,)
            return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if len(args) == 2:               # dict[str, X]: every value checked as an X
            # `name:` with nothing under it is an entry with all defaults.
            empty = {} if dataclasses.is_dataclass(args[1]) else None
            return {str(k): _convert(empty if v is None else v, args[1], f"{key}.{k}")
                    for k, v in value.items()}
        return dict(value)
    # Scalars. bool is a subclass of int in Python: refuse it where a number is meant.
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponent forms without a dot (1e-4, -1e9) as strings.
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that list valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML and W&B."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides, files
# ----------------------------------------------------------------------------------------------

def apply_override(data: dict, cls: type, override: str) -> None:
    """Apply one `a.b.c=value` override to the nested dict `data` (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        where = ".".join(parts[:depth + 1])
        if part not in names:
            raise ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() != "" else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {err}") from None
            return
        node_cls = typing.get_type_hints(node_cls)[part]
        args = typing.get_args(node_cls)
        if typing.get_origin(node_cls) is dict and len(args) == 2 \
                and dataclasses.is_dataclass(args[1]) and depth + 2 < len(parts):
            # A named entry of a dict[str, Section] (e.g. grid `inits.ddpm.overrides=[...]`):
            # the next part names the entry, the rest are the section's fields.
            entries = node.get(part) or {}
            name = parts[depth + 1]
            if not isinstance(entries, dict) or name not in entries:
                raise ConfigError(f"'{where}' has no entry {name!r}; entries: "
                                  f"{', '.join(entries) if isinstance(entries, dict) else '-'}")
            if entries[name] is None:
                entries[name] = {}
            try:
                return apply_override(entries[name], args[1],
                                      ".".join(parts[depth + 2:]) + "=" + raw)
            except ConfigError as err:
                raise ConfigError(f"{where}.{name}: {err}") from None
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"'{where}' is a value, not a section; cannot set '{dotted}'")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{where}' must be a mapping in the config file")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: Optional[type] = None) -> Any:
    """Load `cls` (default: config.common.ExperimentConfig) from a YAML file (optional) and
    apply dotted overrides, all checked."""
    cls = ExperimentConfig if cls is None else cls
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    for override in overrides or []:
        apply_override(data, cls, override)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def config_text(cfg: Any) -> str:
    """The resolved config as YAML (what config.yaml holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (it is what reproduces a run)."""
    return atomic_write_text(Path(path), config_text(cfg))
