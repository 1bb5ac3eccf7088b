"""The ledger: one record type, one status enumeration, one pyarrow schema.

Every stage passes the same record (a dict) along.  A stage that rejects a
record sets a terminal ``status`` and a short ``error`` and passes it on; later
stages let it through untouched.  So the ledger holds exactly one row per input
row, and ``status == "ok"`` exactly for the samples in the shards.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pyarrow as pa


class Status(str, enum.Enum):
    """Terminal fate of an input row.  Documented in README.md."""

    OK = "ok"
    INVALID_INPUT = "invalid_input"
    CAPTION_FILTERED = "caption_filtered"
    LANGUAGE_FILTERED = "language_filtered"
    DUPLICATE_INPUT = "duplicate_input"
    FETCH_FAILED = "fetch_failed"
    DISALLOWED = "disallowed"
    BLOCKED_ADDRESS = "blocked_address"
    DECODE_FAILED = "decode_failed"
    SIZE_FILTERED = "size_filtered"
    DUPLICATE_EXACT = "duplicate_exact"
    DUPLICATE_NEAR = "duplicate_near"
    CLIP_FILTERED = "clip_filtered"
    TAG_FILTERED = "tag_filtered"
    DUPLICATE_SEMANTIC = "duplicate_semantic"

    def __str__(self) -> str:  # so f-strings and JSON give the plain value
        return self.value


@dataclass(frozen=True)
class StatusInfo:
    """What the registry says of one status."""

    status: Status
    stage: str     # the stage (module of paircurate.transforms) that gives it
    label: str     # its row in the funnel (report.html, stats.json) and the CLI summary
    position: int  # its place in the funnel: the order in which statuses arise along the pipeline


#: The status registry: one line per status, in funnel order (the position is the line's place).
#: The enumeration's order means nothing; a new status gets a line here where its stage runs.
STATUS_REGISTRY: Dict[Status, StatusInfo] = {
    info[0]: StatusInfo(*info, position=position) for position, info in enumerate([
        (Status.INVALID_INPUT, "validate", "validate"),
        (Status.CAPTION_FILTERED, "validate", "caption prefilter"),
        (Status.LANGUAGE_FILTERED, "language", "language filter"),
        (Status.DUPLICATE_INPUT, "validate", "input dedup"),
        (Status.FETCH_FAILED, "fetch", "fetch"),
        (Status.DISALLOWED, "fetch", "fetch (opt-out header)"),
        (Status.BLOCKED_ADDRESS, "fetch", "fetch (address check)"),
        (Status.DECODE_FAILED, "resize", "decode/resize"),
        (Status.SIZE_FILTERED, "resize", "decode/resize"),
        (Status.DUPLICATE_EXACT, "dedup", "exact image dedup"),
        (Status.DUPLICATE_NEAR, "dedup", "near image dedup"),
        (Status.CLIP_FILTERED, "clip", "CLIP filter"),
        (Status.TAG_FILTERED, "clip", "CLIP tag filter"),
        (Status.DUPLICATE_SEMANTIC, "dedup", "semantic dedup"),
        (Status.OK, "write", "kept"),
    ])}

#: Order in which statuses arise along the pipeline (the funnel's), ok last.
STATUS_ORDER: List[str] = [info.status.value for info in
                           sorted(STATUS_REGISTRY.values(), key=lambda info: info.position)]
#: The funnel label of each status (by value).
STATUS_LABELS: Dict[str, str] = {info.status.value: info.label for info in STATUS_REGISTRY.values()}


def funnel(by_status: Mapping[str, int]) -> List[Dict[str, Any]]:
    """Rows removed per status, in registry order, and the rows remaining after each.

    Rows in = the sum of all counts; the last ``remaining`` equals the ok count.
    Statuses the registry does not know (from a newer version) come last, before ok.
    """
    order = [s for s in STATUS_ORDER if s != Status.OK.value]
    order += sorted(s for s in by_status if s not in STATUS_LABELS)
    remaining = sum(int(n) for n in by_status.values())
    steps = []
    for status in order:
        removed = int(by_status.get(status, 0))
        remaining -= removed
        steps.append({"stage": STATUS_LABELS.get(status, status), "status": status,
                      "removed": removed, "remaining": remaining})
    return steps

# Core ledger columns, in order.  Carried input columns follow these.
LEDGER_FIELDS: List[pa.Field] = [
    pa.field("uid", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("source", pa.string()),
    pa.field("position", pa.int64()),
    pa.field("http_status", pa.int32()),
    pa.field("content_type", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("image_format", pa.string()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image_sha256", pa.string()),
    pa.field("phash", pa.string()),
    pa.field("low_information", pa.bool_()),
    pa.field("near_signature", pa.string()),
    pa.field("duplicate_of", pa.string()),
    pa.field("clip_score", pa.float32()),
    pa.field("caption_language", pa.string()),
    pa.field("caption_language_score", pa.float32()),
]
LEDGER_COLUMNS: List[str] = [f.name for f in LEDGER_FIELDS]

#: Transient fields that travel with a record between stages but never reach
#: the ledger (image bytes stay out of the ledger by construction).
#: ``image_embedding``: the CLIP image embedding (L2-normalised, float16 bytes), carried
#: from the CLIP stage to semantic dedup only when dedup.semantic is enabled.
TRANSIENT_FIELDS = ("image", "raw", "extra", "image_ref", "clip_columns", "image_embedding")
#: The CLIP stage's own columns (tag_<name>, head_<name>, from clip.tags / clip.heads) travel in
#: the record's "clip_columns" dict and follow clip_score in the ledger (ledger_schema).
CLIP_COLUMN_PREFIXES = ("tag_", "head_")

#: Prefix given to input columns whose names clash with ledger columns.
CLASH_PREFIX = "input_"


def ledger_schema(carried: Optional[pa.Schema] = None, clip_columns: Sequence[str] = ()) -> pa.Schema:
    """The ledger schema: core columns (the CLIP stage's float32 columns after clip_score), then
    the input's carried columns."""
    fields = list(LEDGER_FIELDS)
    after = LEDGER_COLUMNS.index("clip_score") + 1
    fields[after:after] = [pa.field(name, pa.float32()) for name in clip_columns]
    if carried is not None:
        fields.extend(carried)
    return pa.schema(fields)


def carried_name(name: str) -> str:
    """Name under which an input column is carried into the ledger."""
    clashes = (name in LEDGER_COLUMNS or name in TRANSIENT_FIELDS
               or name.startswith(CLIP_COLUMN_PREFIXES))  # tag_/head_: the CLIP stage's columns
    return CLASH_PREFIX + name if clashes else name


def new_record(uid: str, url: Any, caption: Any, source: str, position: int,
               extra: Mapping[str, Any]) -> Dict[str, Any]:
    """A fresh record as the reader emits it (status ok until a stage says otherwise)."""
    record: Dict[str, Any] = {name: None for name in LEDGER_COLUMNS}
    record.update(uid=uid, url=url, caption=caption, status=Status.OK.value,
                  source=source, position=position)
    record["extra"] = dict(extra)
    record["image_ref"] = None
    return record


def is_live(record: Mapping[str, Any]) -> bool:
    """True while no stage has given the record a terminal status."""
    return record["status"] == Status.OK.value


def mark(record: Dict[str, Any], status: Status, error: Optional[str] = None) -> Dict[str, Any]:
    """Give a record its terminal status (and drop image bytes it no longer needs)."""
    record["status"] = status.value
    record["error"] = error
    record["image"] = None
    record["raw"] = None
    return record


#: Field order of a packed record (see pack_record).
_PACKED_FIELDS = tuple(LEDGER_COLUMNS) + TRANSIENT_FIELDS
#: Fields that stages after staging decide or set: all a staged record carries across the
#: shuffles after dedup's (transforms/staging.py: its details are in its blob).
DECIDED_FIELDS = ("uid", "status", "error", "duplicate_of", "clip_score", "key", "shard", "image_ref",
                  "clip_columns")
_UNDECIDED_FIELDS = tuple(name for name in _PACKED_FIELDS if name not in DECIDED_FIELDS)


def _record_coder():
    from apache_beam.coders import FastPrimitivesCoder  # Beam's own coder for Python values

    return FastPrimitivesCoder()


def pack_record(record: Mapping[str, Any]) -> bytes:
    """A record as opaque bytes: its values in a fixed field order, encoded, for shuffles.

    Encoded, a dict repeats every field name in every element; the values
    alone are about a third fewer bytes.  And as one bytes object, a record
    waiting in a local runner's grouping table costs its encoded size plus a
    few dozen bytes, not a tuple of two dozen Python objects (several times more).
    A record with only DECIDED_FIELDS set (a staged one after dedup) packs those
    alone: two dozen fewer bytes than its None for every other field.
    """
    if all(record.get(name) is None for name in _UNDECIDED_FIELDS):
        return _RECORD_CODER.encode(tuple(record.get(name) for name in DECIDED_FIELDS))
    return _RECORD_CODER.encode(tuple(record.get(name) for name in _PACKED_FIELDS))


def unpack_record(packed: bytes) -> Dict[str, Any]:
    """The record pack_record() packed: every packed field, in _PACKED_FIELDS order (None if unset)."""
    values = _RECORD_CODER.decode(packed)
    if len(values) == len(DECIDED_FIELDS):
        record = dict.fromkeys(_PACKED_FIELDS)
        record.update(zip(DECIDED_FIELDS, values))
        return record
    return dict(zip(_PACKED_FIELDS, values))


_RECORD_CODER = _record_coder()


def ledger_row(record: Mapping[str, Any], carried_names: Iterable[str],
               clip_columns: Iterable[str] = ()) -> Dict[str, Any]:
    """The ledger row of a record: core columns, the CLIP stage's columns, carried input columns."""
    row = {name: record.get(name) for name in LEDGER_COLUMNS}
    computed = record.get("clip_columns") or {}
    for name in clip_columns:
        row[name] = computed.get(name)  # None: not scored
    extra = record.get("extra") or {}
    for name in carried_names:
        row[name] = extra.get(name)
    return row


def error_class(error: Optional[str]) -> Optional[str]:
    """The short class of an error string ``"class: detail"`` (``"http_404"``, ``"timeout"``, ...)."""
    if not error:
        return None
    return error.split(":", 1)[0].strip()
