"""Validation, the caption prefilter and exact URL+caption dedup of the input list."""
from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam

from paircurate.transforms.beam_util import metered_group
from paircurate.transforms.language import DetectLanguage, check_languages
from paircurate.transforms.schema import Status, is_live, mark, pack_record, unpack_record
from paircurate.transforms.settings import AT_LEAST_ONE, NON_NEGATIVE, Bounds, ConfigError, setting
from paircurate.transforms.stage import RecordStage, Verdict


@dataclass
class FilterConfig:
    # LAION drops captions under 5 characters.
    min_caption_length: int = setting(5, NON_NEGATIVE)
    max_caption_length: int = setting(10000, AT_LEAST_ONE)
    # Exact URL+caption dedup of the input list (duplicate_input).
    dedup_input: bool = True
    # Caption language (transforms/language.py): detect it (caption_language, _score columns).
    detect_language: bool = True
    # Keep only captions in these ISO 639-1 languages ("und": no language detected); empty: all.
    # Others are language_filtered before anything is downloaded.
    languages: List[str] = field(default_factory=list)
    # Below this probability a caption has no detected language (und); see README.
    language_min_score: float = setting(0.2, Bounds(0, 1))  # a probability

    def check(self) -> None:
        if self.min_caption_length > self.max_caption_length:
            raise ConfigError("filter.min_caption_length must not exceed filter.max_caption_length")
        if self.languages:
            if not self.detect_language:
                raise ConfigError("filter.languages needs filter.detect_language: true")
            check_languages(self.languages)


class ValidateInput(RecordStage):
    """Missing or empty URL, non-string fields, URLs without a scheme, unparsable rows -> invalid_input."""

    namespace = "validate"

    def check(self, record: Dict[str, Any]) -> Verdict:
        problem = input_problem(record)
        if problem:
            # The ledger's url and caption columns are strings: a value of another type is
            # kept as its JSON text, so the row stays visible and the ledger stays writable.
            record["url"], record["caption"] = as_text(record.get("url")), as_text(record.get("caption"))
            return Status.INVALID_INPUT, problem
        record["url"] = record["url"].strip()
        return None


def input_problem(record: Dict[str, Any]) -> Optional[str]:
    """What makes an input row unusable ("field: problem"), or None."""
    problem = (record.get("extra") or {}).pop("__invalid__", None)
    url, caption = record.get("url"), record.get("caption")
    if problem:
        return f"row: {problem}"
    if url is None:
        return "url: missing"
    if not isinstance(url, str):
        return f"url: not a string ({type(url).__name__})"
    if not url.strip():
        return "url: empty"
    if caption is not None and not isinstance(caption, str):
        return f"caption: not a string ({type(caption).__name__})"
    try:
        scheme = urllib.parse.urlsplit(url.strip()).scheme
    except ValueError:
        scheme = "?"  # malformed after the scheme: the fetch stage names the problem
    if not scheme:
        return "url: no scheme"
    # Schemes other than http(s) are the fetch stage's to refuse (blocked_address).
    return None


def as_text(value: Any) -> Optional[str]:
    """A ledger string for any input value: strings as they are, others as JSON text (or str())."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):  # bytes, dates, ... from Parquet
        return str(value)


class CaptionFilter(RecordStage):
    """LAION's caption rule: too short (or too long) -> caption_filtered (inputs without captions pass)."""

    namespace = "caption"

    def __init__(self, config: FilterConfig, has_captions: bool = True):
        self._config = config
        self._has_captions = has_captions

    def check(self, record: Dict[str, Any]) -> Verdict:
        if not self._has_captions:
            return None
        config = self._config
        length = len((record.get("caption") or "").strip())
        if length < config.min_caption_length:
            return Status.CAPTION_FILTERED, f"too_short: {length} < {config.min_caption_length}"
        if length > config.max_caption_length:
            return Status.CAPTION_FILTERED, f"too_long: {length} > {config.max_caption_length}"
        return None


def input_key(record: Dict[str, Any]) -> bytes:
    """128-bit digest of the URL and caption: the shuffle key moves 16 bytes, not both texts again."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(record["url"].encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update((record.get("caption") or "").encode("utf-8", "surrogatepass"))
    return digest.digest()


def _listing_order(record: Dict[str, Any]) -> Tuple[str, int, str]:
    return record["source"], record["position"], record["uid"]


def keep_first(records: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """Of records with the same URL and caption, keep the first by (source, position).

    Two passes over the group instead of a sort, so a URL listed a million
    times is streamed rather than held and sorted (Beam's grouped values can be
    iterated again).
    """
    first = min(_listing_order(r) for r in records)
    for record in records:
        if _listing_order(record) != first:
            mark(record, Status.DUPLICATE_INPUT, "same_url_caption")
            record["duplicate_of"] = first[2]
        yield record


class _Unpacked:
    """A grouped iterable of packed records, unpacked lazily on each pass (keep_first makes two)."""

    def __init__(self, packed: Iterable[tuple]):
        self._packed = packed

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return (unpack_record(values) for values in self._packed)


class ValidateAndFilter(beam.PTransform):
    """validate -> caption prefilter -> caption language -> URL+caption dedup (a shuffle on the pair)."""

    def __init__(self, config: FilterConfig, has_captions: bool = True):
        super().__init__()
        self._config = config
        self._has_captions = has_captions

    def expand(self, records):
        config, has_captions = self._config, self._has_captions
        checked = (records
                   | "Validate" >> beam.ParDo(ValidateInput())
                   | "Caption" >> beam.ParDo(CaptionFilter(config, has_captions)))
        if config.detect_language:
            checked = checked | "Language" >> DetectLanguage(
                config.languages, config.language_min_score, has_captions)
        if not config.dedup_input:
            return checked
        live, done = checked | "SplitLive" >> beam.Partition(lambda r, _: 0 if is_live(r) else 1, 2)
        keyed = live | "KeyByPair" >> beam.Map(lambda r: (input_key(r), pack_record(r)))
        deduped = (metered_group(keyed, "GroupPairs")
                   | "KeepFirst" >> beam.FlatMap(
                       lambda kv: keep_first(_Unpacked(kv[1]))))
        return (deduped, done) | "Merge" >> beam.Flatten()
