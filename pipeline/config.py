"""One typed configuration, loaded from YAML and overridable with ``--set``.

Each stage's section (a dataclass with its allowed values and checks) lives beside the stage in
paircurate.transforms; Config composes them, and the runner's section, into one.

Unknown sections or keys are errors that list the valid ones; values are
checked against the declared types, so a typo fails at start-up, not after an
hour of downloading.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from paircurate.transforms.clip_model import ClipConfig
from paircurate.transforms.dedup import DedupConfig
from paircurate.transforms.fetch import FetchConfig
from paircurate.transforms.read import InputConfig
from paircurate.transforms.resize import ImageConfig
from paircurate.transforms.settings import NON_NEGATIVE, Bounds, ConfigError, check_values, declared, sections, setting
from paircurate.transforms.validate import FilterConfig
from paircurate.transforms.write import OutputConfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: configs/ ships inside the package (see pyproject) and lies beside it in a checkout.
CONFIG_DIRS = [os.path.join(PACKAGE_DIR, "configs"),
               os.path.join(os.path.dirname(PACKAGE_DIR), "configs")]


@dataclass
class RunnerConfig:
    runner: str = "DirectRunner"
    # DirectRunner only: in_memory | multi_threading | multi_processing
    direct_running_mode: str = setting("in_memory", choices=("in_memory", "multi_threading", "multi_processing"))
    direct_num_workers: int = setting(1, NON_NEGATIVE)  # 0: one per CPU core (Beam)
    # Beam pipeline options for the runner, as key: value (lists repeat the flag),
    # e.g. project, region, temp_location, sdk_container_image, experiments.
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting where it is lossless."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", ".inf"):
            return math.inf
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(section_obj: Any, values: Mapping[str, Any], section: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    valid = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"unknown key '{section}.{key}'; valid keys of '{section}': "
                              + ", ".join(valid))
        if dataclasses.is_dataclass(hints[key]):  # a nested section, e.g. dedup.semantic
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{section}.{key}' must be a mapping of keys to values")
            _apply(getattr(section_obj, key), value, f"{section}.{key}")
            continue
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def merge(config: Config, data: Mapping[str, Any]) -> Config:
    """Apply a nested mapping (as read from YAML) onto ``config``."""
    sections = [f.name for f in dataclasses.fields(config)]
    for section, values in (data or {}).items():
        if section not in sections:
            raise ConfigError(f"unknown section '{section}'; valid sections: " + ", ".join(sections))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values")
        _apply(getattr(config, section), values, section)
    return config


def parse_override(text: str) -> Dict[str, Any]:
    """``section.key=value`` -> {section: {key: value}}; the value is parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for name in reversed(path.strip().split(".")):  # dedup.semantic.enabled -> nested mappings
        value = {name: value}
    return value


def find_config_file(name: str) -> str:
    """A config path as given, or a name in the shipped configs/ folder."""
    if os.path.exists(name):
        return name
    for folder in CONFIG_DIRS:
        for candidate in (name, name + ".yaml"):
            path = os.path.join(folder, candidate)
            if os.path.exists(path):
                return path
    raise ConfigError(f"config file not found: {name}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (configs/local.yaml when none is given), then overrides."""
    config = Config()
    path = find_config_file(path or "local")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections")
    merge(config, data)
    for text in overrides:
        merge(config, parse_override(text))
    validate(config)
    return config


#: Every numeric key and its allowed values, and every key with a fixed set of values, as the
#: sections declare them beside their fields (paircurate.transforms.settings.setting).
RANGES: Dict[str, Bounds] = {}
CHOICES: Dict[str, Sequence[str]] = {}
for _section in dataclasses.fields(Config):
    for _key, _item in declared(_section.name, _section.default_factory):
        if "bounds" in _item.metadata:
            RANGES[_key] = _item.metadata["bounds"]
        if "choices" in _item.metadata:
            CHOICES[_key] = _item.metadata["choices"]


def validate(config: Config) -> None:
    """Ranges and choices of single keys, then each section's checks that involve several keys."""
    every = [found for item in dataclasses.fields(config)
             for found in sections(item.name, getattr(config, item.name))]
    for name, section in every:
        check_values(name, section)
    for _, section in every:
        check = getattr(section, "check", None)
        if check is not None:
            check()
    # Checks across sections.
    if config.dedup.semantic.enabled and not config.clip.enabled:
        raise ConfigError("dedup.semantic.enabled needs the CLIP stage (its image embeddings): "
                          "clip.enabled is false (--no-clip)")
