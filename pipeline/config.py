"""One typed configuration, loaded from YAML and overridable with ``--set``.

Unknown sections or keys are errors that list the valid ones; values are
checked against the declared types, so a typo fails at start-up, not after an
hour of downloading.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: configs/ ships inside the package (see pyproject) and lies beside it in a checkout.
CONFIG_DIRS = [os.path.join(PACKAGE_DIR, "configs"),
               os.path.join(os.path.dirname(PACKAGE_DIR), "configs")]


class ConfigError(ValueError):
    """A configuration the user wrote is wrong; the message says how."""


@dataclass
class InputConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    # auto | parquet | csv | tsv | jsonl | txt (auto: from the file name)
    format: str = "auto"
    # Text inputs (txt, tsv, jsonl) are split into byte ranges of this size so
    # that several workers read one large file.
    split_bytes: int = 64 * 1024 * 1024


@dataclass
class FilterConfig:
    # LAION drops captions under 5 characters.
    min_caption_length: int = 5
    max_caption_length: int = 10000
    # Exact URL+caption dedup of the input list (duplicate_input).
    dedup_input: bool = True
    # Caption language (transforms/language.py): detect it (caption_language, _score columns).
    detect_language: bool = True
    # Keep only captions in these ISO 639-1 languages ("und": no language detected); empty: all.
    # Others are language_filtered before anything is downloaded.
    languages: List[str] = field(default_factory=list)
    # Below this probability a caption has no detected language (und); see README.
    language_min_score: float = 0.2


@dataclass
class FetchConfig:
    threads: int = 64
    connect_timeout: float = 10.0
    # Limit for the whole response (headers and body), not per read.
    timeout: float = 30.0
    # Limit for everything one URL may take: every attempt, redirect hop, backoff and
    # Retry-After wait (None: 3 x timeout).  Past it the row is fetch_failed "timeout: deadline".
    url_deadline: Optional[float] = None
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0
    # Retry timeouts too?  Off: a retried timeout costs another whole timeout.
    retry_timeouts: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    per_host_concurrency: int = 16
    user_agent: str = "paircurate/0.1 (+https://github.com/paircurate/paircurate)"
    user_agent_token: str = "paircurate"
    # X-Robots-Tag directives that mark an image as opted out (img2dataset's defaults).
    disallowed_header_directives: List[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # SSRF protection: refuse private, loopback, link-local, ... addresses.
    block_private_addresses: bool = True
    # host:port pairs exempt from the address check (tests and the demo serve on loopback).
    allowed_hosts: List[str] = field(default_factory=list)


@dataclass
class ImageConfig:
    image_size: int = 256
    # img2dataset resize modes: no | keep_ratio | keep_ratio_largest | center_crop | border
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    # Images with more pixels than this are refused before decoding (decompression bombs).
    max_image_pixels: int = 100_000_000
    # Decode/resize threads per worker (0: one per CPU core).
    threads: int = 0


@dataclass
class SemanticDedupConfig:
    """dedup.semantic: duplicates by CLIP image embedding, after the CLIP stage (transforms/semantic.py)."""
    enabled: bool = False
    # Pairs at or above this cosine similarity of their image embeddings are duplicates
    # (SemDeDup thresholds the cosine distance 1 - cos with epsilon: 0.95 is epsilon 0.05).
    min_cosine: float = 0.95
    # Random-hyperplane LSH: bands of ``bits`` sign bits each; a pair that agrees on every
    # bit of one band is a candidate.  30 x 16 measured recall 0.998 at cosine 0.95-0.955
    # (benchmarks/semantic_recall.py; README, Semantic duplicates).
    bands: int = 30
    bits: int = 16
    # Seed of the hyperplanes (every worker draws the same ones).
    seed: int = 0
    # Upper bound on comparisons inside one band bucket; over it a sliding window (metric
    # semantic/bucket_overflows), as the pHash stage does.
    max_bucket_comparisons: int = 200_000


@dataclass
class DedupConfig:
    enabled: bool = True
    exact: bool = True
    near: bool = True
    # imagehash function: phash | dhash | ahash | whash
    hash: str = "phash"
    hash_size: int = 8
    max_distance: int = 6
    # Images whose information measure is below this (fog, haze, gradient skies) are near
    # duplicates only under the strict low-contrast verification (phash.verify_distance).
    min_information: float = 1.5
    # Below this information the near search hashes with phash.smooth_hash, not the pHash.
    smooth_below: float = 4.0
    # Mirrored copies are near duplicates (canonical orientation; see phash.near_entries).
    flips: bool = True
    # Verify every candidate pair on the images' thumbnails (phash.verify_distance) and keep
    # it only at verify_max_distance or less (1.0: the measured tolerances).
    verify: bool = True
    verify_max_distance: float = 1.0
    # Ledgers of earlier runs (paths or globs); their ok samples always win.
    history: List[str] = field(default_factory=list)
    # Upper bound on pairwise comparisons inside one candidate bucket; a bucket
    # over it is compared in a window (see transforms/phash.py; metric dedup/bucket_overflows).
    max_bucket_comparisons: int = 200_000
    # Pigeonhole blocks m per hash for candidate keys (0: max_distance + 3, i.e. keys of
    # three blocks; see transforms/phash.py for the sizing at a billion images).
    blocks: int = 0
    # Shuffle partitions the candidate buckets are spread over (batches of buckets, so
    # the shuffle carries numpy arrays, not one element per key).  Per partition in
    # memory: items * keys / partitions entries of 9 bytes; raise it beyond ~1e9 items.
    partitions: int = 4096
    # Distinct hashes per worker batch when the bucket keys are computed.
    key_batch: int = 65536
    # Rounds of min-label propagation over near-duplicate pairs; clusters of diameter
    # up to this are exact (metric dedup/unconverged_nodes counts the rest).
    cluster_rounds: int = 8
    # Semantic duplicates by CLIP image embedding (off unless enabled; needs the CLIP stage).
    semantic: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)


#: clip.tags' default: zero-shot tags in the spirit of LAION-400M's CLIP-based tagging (README,
#: "Tags and heads"): as many positive as negative prompts, so neither side starts ahead.
DEFAULT_TAGS: Dict[str, Any] = {
    "unsafe": {"positive": ["a photo containing nudity", "an explicit sexual image",
                            "a pornographic picture", "a photo of graphic violence and gore"],
               "negative": ["a safe for work photo", "a photo of people wearing clothes",
                            "an ordinary everyday picture", "a family friendly image"]},
    "watermark": {"positive": ["a photo with a watermark", "an image with a text overlay logo",
                               "a stock photo with a watermark across it"],
                  "negative": ["a photo without a watermark", "a clean image with no text or logo",
                               "a photo with no overlay"]},
}


@dataclass
class ClipConfig:
    enabled: bool = True
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    # JSON model config for custom architectures (a path, or a file name in configs/models).
    model_config: Optional[str] = None
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    precision: str = "auto"
    batch_size: int = 256
    min_score: Optional[float] = None
    keep_fraction: Optional[float] = None
    save_embeddings: bool = False
    # Threads that decode and resize images for the model (0: one per CPU core).
    preprocess_threads: int = 0
    # exact: open_clip's own PIL transform (scores match open_clip within 1e-4) |
    # fast: JPEG draft decoding and a batched resize on the model's device (measured
    # score difference at most 0.01; README "CLIP scoring and filtering").
    preprocess: str = "fast"
    # Where open_clip / Hugging Face weights are looked up (None: their default caches).
    cache_dir: Optional[str] = None
    # Serve one model per machine to all worker processes (Beam multi_process_shared).
    share_model_across_processes: bool = False
    # Zero-shot tags: name -> {positive: [prompts], negative: [prompts]}; each scored pair gets
    # tag_<name>, the softmax probability of the positive prompts ({}: no tags).
    tags: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_TAGS))
    # Tag filters: name -> highest probability kept; above it -> tag_filtered.
    tag_max: Dict[str, float] = field(default_factory=dict)
    # Trained heads on the image embedding: name -> {path, activation: none|sigmoid, hidden: relu|none}.
    heads: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    samples_per_shard: int = 10000
    report: bool = True
    # Staging segments (image bytes kept where they were made, see transforms/staging.py):
    # a segment is closed, and so becomes resumable, after this many images or bytes.
    staging_segment_records: int = 1000
    staging_segment_bytes: int = 64 * 1024 * 1024


@dataclass
class RunnerConfig:
    runner: str = "DirectRunner"
    # DirectRunner only: in_memory | multi_threading | multi_processing
    direct_running_mode: str = "in_memory"
    direct_num_workers: int = 1
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

#: Every numeric key and its allowed values (tests check that none is missing).  An unset
#: Optional key (None) is not checked.
RANGES: Dict[str, Bounds] = {
    "input.split_bytes": AT_LEAST_ONE,
    "filter.min_caption_length": NON_NEGATIVE,
    "filter.max_caption_length": AT_LEAST_ONE,
    "filter.language_min_score": Bounds(0, 1),     # a probability
    "fetch.threads": AT_LEAST_ONE,
    "fetch.connect_timeout": POSITIVE,
    "fetch.timeout": POSITIVE,
    "fetch.url_deadline": POSITIVE,
    "fetch.retries": NON_NEGATIVE,
    "fetch.backoff_base": NON_NEGATIVE,
    "fetch.backoff_max": NON_NEGATIVE,
    "fetch.retry_after_max": NON_NEGATIVE,
    "fetch.max_bytes": AT_LEAST_ONE,
    "fetch.max_redirects": NON_NEGATIVE,
    "fetch.per_host_concurrency": AT_LEAST_ONE,
    "image.image_size": Bounds(1, 65535),          # JPEG's largest side
    "image.encode_quality": Bounds(0, 100),        # PNG: 0-9, checked below
    "image.min_image_size": NON_NEGATIVE,
    "image.max_aspect_ratio": Bounds(1, allow_inf=True),  # larger side / smaller side
    "image.max_image_pixels": AT_LEAST_ONE,
    "image.threads": NON_NEGATIVE,                 # 0: one per CPU core
    "dedup.hash_size": Bounds(2, 32),              # imagehash needs 2+; near search 8 at most
    "dedup.max_distance": NON_NEGATIVE,            # at most the hash's bits, checked below
    "dedup.min_information": Bounds(0),
    "dedup.smooth_below": Bounds(0),
    "dedup.verify_max_distance": Bounds(0),
    "dedup.max_bucket_comparisons": AT_LEAST_ONE,
    "dedup.blocks": NON_NEGATIVE,                  # 0: automatic; else above max_distance
    "dedup.partitions": AT_LEAST_ONE,
    "dedup.key_batch": AT_LEAST_ONE,
    "dedup.cluster_rounds": AT_LEAST_ONE,
    "dedup.semantic.min_cosine": Bounds(-1, 1),    # a cosine similarity
    "dedup.semantic.bands": Bounds(1, 255),        # the band index is one byte
    "dedup.semantic.bits": Bounds(8, 64),          # whole bytes, checked below
    "dedup.semantic.seed": NON_NEGATIVE,
    "dedup.semantic.max_bucket_comparisons": AT_LEAST_ONE,
    "clip.batch_size": AT_LEAST_ONE,
    "clip.min_score": Bounds(-1, 1),               # a cosine similarity
    "clip.keep_fraction": Bounds(0, 1, low_open=True),
    "clip.preprocess_threads": NON_NEGATIVE,       # 0: one per CPU core
    "output.samples_per_shard": AT_LEAST_ONE,
    "output.staging_segment_records": AT_LEAST_ONE,
    "output.staging_segment_bytes": AT_LEAST_ONE,
    "runner.direct_num_workers": NON_NEGATIVE,     # 0: one per CPU core (Beam)
}

#: Every key with a fixed set of values.
CHOICES: Dict[str, Sequence[str]] = {
    "input.format": ("auto", "parquet", "csv", "tsv", "jsonl", "txt"),
    "image.resize_mode": ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"),
    "image.encode_format": ("jpg", "png", "webp"),
    "dedup.hash": ("phash", "dhash", "ahash", "whash"),
    "clip.precision": ("auto", "fp32", "fp16", "bf16"),
    "runner.direct_running_mode": ("in_memory", "multi_threading", "multi_processing"),
}


def _value(config: Config, key: str) -> Any:
    value: Any = config
    for name in key.split("."):  # section.key or section.nested.key
        value = getattr(value, name)
    return value


def check_ranges(config: Config) -> None:
    """Refuse a numeric value outside its declared range or a value outside its choices."""
    for key, bounds in RANGES.items():
        value = _value(config, key)
        if value is not None and not bounds.allows(value):
            finite = "" if math.isfinite(value) else ", a finite number"
            raise ConfigError(f"{key}={value!r} is out of range: must be {bounds.describe()}{finite}")
    for key, choices in CHOICES.items():
        value = _value(config, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: must be one of " + ", ".join(choices))
    device = config.clip.device
    if not (device in ("auto", "cpu", "cuda")
            or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"clip.device={device!r}: must be auto, cpu, cuda or cuda:N")


def validate(config: Config) -> None:
    """Ranges and choices of single keys, then the checks that involve several keys."""
    check_ranges(config)
    if config.filter.min_caption_length > config.filter.max_caption_length:
        raise ConfigError("filter.min_caption_length must not exceed filter.max_caption_length")
    if config.image.encode_format == "png" and not 0 <= config.image.encode_quality <= 9:
        raise ConfigError("with image.encode_format png, image.encode_quality is the PNG "
                          "compression level and must be 0-9")
    if config.filter.languages:
        from paircurate.transforms.language import check_languages
        if not config.filter.detect_language:
            raise ConfigError("filter.languages needs filter.detect_language: true")
        check_languages(config.filter.languages)
    clip = config.clip
    if clip.min_score is not None and clip.keep_fraction is not None:
        raise ConfigError("set clip.min_score or clip.keep_fraction, not both")
    from paircurate.transforms.clip_tags import check_config as check_tags_and_heads
    check_tags_and_heads(clip)
    dedup = config.dedup
    if dedup.near and dedup.hash_size > 8:
        raise ConfigError("dedup.hash_size must be at most 8 (64-bit hashes) for near-duplicate search")
    bits = dedup.hash_size ** 2
    if not 0 <= dedup.max_distance <= bits:
        raise ConfigError(f"dedup.max_distance must be between 0 and the hash's bit count ({bits})")
    if dedup.semantic.enabled and not clip.enabled:
        raise ConfigError("dedup.semantic.enabled needs the CLIP stage (its image embeddings): "
                          "clip.enabled is false (--no-clip)")
    if dedup.semantic.bits % 8:
        raise ConfigError(f"dedup.semantic.bits={dedup.semantic.bits}: must be a multiple of 8 (whole bytes)")
    if dedup.blocks and not dedup.max_distance < dedup.blocks <= bits:
        raise ConfigError(f"dedup.blocks must be 0 (automatic) or above dedup.max_distance "
                          f"({dedup.max_distance}) and at most the hash's bit count ({bits})")
