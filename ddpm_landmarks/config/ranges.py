"""Allowed ranges of numeric config fields, declared next to each field:

    sigma: float = ranged(3.0, "> 0")                        # in model-grid pixels
    flip_prob: float = ranged(0.0, "[0, 1]")
    scale: tuple[float, float] = ranged((0.9, 1.1), "> 0", ordered=True)
    budget: Optional[int] = ranged(None, ">= 1")             # None is always allowed

Range notation: "> a", ">= a", "< b", "<= b", intervals "[a, b]", "(a, b]", "[a, b)", "(a, b)",
a set "{1, 3}", or "any" (every number, +/-inf included: e.g. decoder.min_peak = -inf).
A list, tuple or dict field applies the range to each of its numbers; `ordered=True` also asks
for low <= high (a (low, high) pair). NaN is never allowed, and +/-inf only under "any".

schema.from_dict checks every field it builds (so every YAML file and override: run configs,
saved config.yaml files, the grid's experiment file) and then calls the dataclass's own
`check_fields(prefix)` when it has one, for the few rules that join two fields (e.g. an smp
architecture needs data.image_size to be a multiple of 32). Errors are ConfigErrors naming
the dotted key, the value and the allowed range. Defaults written in code are not re-checked at
load; tests/config/test_ranges.py checks them and that every numeric field has a range.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from ddpm_landmarks.errors import ConfigError

RANGE_KEY = "range"                     # dataclasses.field metadata key

_NUMBER = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?)"
_BOUND = re.compile(rf"^(?P<op>>=|<=|>|<)\s*(?P<x>{_NUMBER})$")
_INTERVAL = re.compile(rf"^(?P<lo_b>[\[(])\s*(?P<lo>{_NUMBER})\s*,\s*(?P<hi>{_NUMBER})\s*"
                       rf"(?P<hi_b>[\])])$")


@dataclass(frozen=True)
class Range:
    """A parsed range (see the module doc); `text` is how errors show it."""
    text: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple[float, ...]] = None
    ordered: bool = False

    @property
    def allows_inf(self) -> bool:
        return self.text == "any"

    def contains(self, x: float) -> bool:
        if math.isnan(x) or (math.isinf(x) and not self.allows_inf):
            return False
        if self.choices is not None:
            return x in self.choices
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below


def parse_range(text: str, ordered: bool = False) -> Range:
    spec = text.strip().lower()
    if spec == "any":
        return Range(text, ordered=ordered)
    if spec.startswith("{") and spec.endswith("}"):
        choices = tuple(float(v) for v in spec[1:-1].split(","))
        return Range(text, choices=choices, ordered=ordered)
    if m := _BOUND.match(spec):
        x = float(m["x"])
        op = m["op"]
        if op.startswith(">"):
            return Range(text, low=x, low_open=op == ">", ordered=ordered)
        return Range(text, high=x, high_open=op == "<", ordered=ordered)
    if m := _INTERVAL.match(spec):
        return Range(text, low=float(m["lo"]), high=float(m["hi"]), low_open=m["lo_b"] == "(",
                     high_open=m["hi_b"] == ")", ordered=ordered)
    raise ValueError(f"cannot parse the range {text!r} (see ddpm_landmarks/config/ranges.py)")


def ranged(default: Any, spec: str, *, ordered: bool = False) -> Any:
    """A dataclass field with `default` and the allowed range `spec` (module doc)."""
    metadata = {RANGE_KEY: parse_range(spec, ordered)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _numbers(value: Any, key: str) -> list[tuple[str, Any]]:
    """(dotted key, number) for a scalar, or each number of a list / tuple / dict value."""
    if isinstance(value, (list, tuple)):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return [(f"{key}.{k}", v) for k, v in value.items()]
    return [(key, value)]


def check_value(value: Any, allowed: Range, key: str) -> None:
    """ConfigError naming `key` unless every number in `value` is in `allowed`."""
    if value is None:
        return
    for where, number in _numbers(value, key):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue                    # e.g. class_weights: "balanced" (the type was checked)
        if not allowed.contains(float(number)):
            raise ConfigError(f"{where}: {number!r} is outside the allowed range "
                              f"{allowed.text}")
    if allowed.ordered and isinstance(value, (list, tuple)) and list(value) != sorted(value):
        raise ConfigError(f"{key}: {list(value)} must be ordered low <= high")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check the fields of one config dataclass instance against their declared ranges, then
    its cross-field rules (`check_fields`, when the class has one). Nested sections are checked
    when they are built (schema.from_dict), not here."""
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get(RANGE_KEY)
        if allowed is not None:
            check_value(getattr(obj, f.name), allowed, dotted(prefix, f.name))
    cross = getattr(obj, "check_fields", None)
    if cross is not None:
        cross(prefix)


def dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def range_of(cls: type, name: str) -> Optional[Range]:
    """The declared range of field `name` of dataclass `cls` (None when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(RANGE_KEY)
    raise KeyError(name)
