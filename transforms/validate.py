"""Validation, the caption prefilter and exact URL+caption dedup of the input list."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Tuple

import apache_beam as beam

from paircurate.config import FilterConfig
from paircurate.beam_util import metered_group
from paircurate.schema import Status, is_live, mark, pack_record, unpack_record


def validate(record: Dict[str, Any]) -> Dict[str, Any]:
    """Missing or empty URL, non-string fields, unparsable rows -> invalid_input."""
    if not is_live(record):
        return record
    problem = (record.get("extra") or {}).pop("__invalid__", None)
    url, caption = record.get("url"), record.get("caption")
    if problem:
        return mark(record, Status.INVALID_INPUT, f"row: {problem}")
    if url is None:
        return mark(record, Status.INVALID_INPUT, "url: missing")
    if not isinstance(url, str):
        return mark(record, Status.INVALID_INPUT, f"url: not a string ({type(url).__name__})")
    if not url.strip():
        return mark(record, Status.INVALID_INPUT, "url: empty")
    if caption is not None and not isinstance(caption, str):
        return mark(record, Status.INVALID_INPUT, f"caption: not a string ({type(caption).__name__})")
    record["url"] = url.strip()
    return record


def prefilter_caption(record: Dict[str, Any], config: FilterConfig,
                      has_captions: bool = True) -> Dict[str, Any]:
    """LAION's caption rule: too short (or too long) -> caption_filtered."""
    if not is_live(record) or not has_captions:
        return record
    length = len((record.get("caption") or "").strip())
    if length < config.min_caption_length:
        return mark(record, Status.CAPTION_FILTERED, f"too_short: {length} < {config.min_caption_length}")
    if length > config.max_caption_length:
        return mark(record, Status.CAPTION_FILTERED, f"too_long: {length} > {config.max_caption_length}")
    return record


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
    """validate -> caption prefilter -> URL+caption dedup (a shuffle on the pair)."""

    def __init__(self, config: FilterConfig, has_captions: bool = True):
        super().__init__()
        self._config = config
        self._has_captions = has_captions

    def expand(self, records):
        config, has_captions = self._config, self._has_captions
        checked = (records
                   | "Validate" >> beam.Map(validate)
                   | "Caption" >> beam.Map(prefilter_caption, config, has_captions))
        if not config.dedup_input:
            return checked
        live, done = checked | "SplitLive" >> beam.Partition(lambda r, _: 0 if is_live(r) else 1, 2)
        keyed = live | "KeyByPair" >> beam.Map(lambda r: (input_key(r), pack_record(r)))
        deduped = (metered_group(keyed, "GroupPairs")
                   | "KeepFirst" >> beam.FlatMap(
                       lambda kv: keep_first(_Unpacked(kv[1]))))
        return (deduped, done) | "Merge" >> beam.Flatten()
