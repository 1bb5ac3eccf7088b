"""How a stage declares its settings: allowed values beside each field, checks beside the section.

A stage's config is a dataclass in the stage's module.  A numeric field declares its bounds
and a text field its choices with ``setting(default, bounds)`` / ``setting(default,
choices=...)``; checks that involve several fields go in the dataclass's ``check()``.
paircurate.config composes the sections into one Config, loads YAML and ``--set`` onto it,
and runs these checks (``check_values``, then each section's ``check()``), so a typo fails at start-up.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A configuration the user wrote is wrong; the message says how."""


@dataclass(frozen=True)
class Bounds:
    """The allowed values of one numeric key: ``low <= value <= high`` (``low < value`` when
    ``low_open``); infinity only where ``allow_inf`` (NaN never)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    allow_inf: bool = False

    def allows(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        low = None if self.low is None else f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        high = None if self.high is None else f"at most {self.high:g}"
        text = " and ".join(t for t in (low, high) if t) or "a number"
        return text + (" (inf allowed)" if self.allow_inf else "")


POSITIVE = Bounds(0, low_open=True)   # seconds, sizes: 0 makes no sense
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)


def setting(default: Any = dataclasses.MISSING, bounds: Optional[Bounds] = None,
            choices: Optional[Sequence[str]] = None, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its allowed values: numeric ``bounds`` or a fixed set of ``choices``."""
    metadata = {}
    if bounds is not None:
        metadata["bounds"] = bounds
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def sections(name: str, section: Any) -> Iterator[Tuple[str, Any]]:
    """(name, section) for a section and, depth first, the sections nested in it (dedup.semantic)."""
    yield name, section
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from sections(f"{name}.{item.name}", value)


def declared(name: str, section_type: type) -> Iterator[Tuple[str, dataclasses.Field]]:
    """(dotted key, field) for every setting of a section type, nested sections' included."""
    for item in dataclasses.fields(section_type):
        factory = item.default_factory
        if dataclasses.is_dataclass(factory) and isinstance(factory, type):
            yield from declared(f"{name}.{item.name}", factory)
        else:
            yield f"{name}.{item.name}", item


def check_values(section_name: str, section: Any) -> None:
    """Refuse a value outside its declared bounds or choices (an unset Optional, None, passes)."""
    for item in dataclasses.fields(section):
        key, value = f"{section_name}.{item.name}", getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            continue  # a nested section: checked on its own (sections())
        bounds = item.metadata.get("bounds")
        if bounds is not None and value is not None and not bounds.allows(value):
            finite = "" if math.isfinite(value) else ", a finite number"
            raise ConfigError(f"{key}={value!r} is out of range: must be {bounds.describe()}{finite}")
        choices = item.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r}: must be one of " + ", ".join(choices))
