"""Staging: image bytes and record details stay on the worker that made them.

The worker that fetched, resized and hashed an image appends one blob, the
record's details as JSON followed by the image bytes the run will ship, to a
segment file under the run's staging folder, and the record is slimmed to the
few fields that later stages decide on or compare (uid, status, dedup
signatures, scores, shard) plus a reference,
``image_ref = "SEGMENT:OFFSET:META_LENGTH:IMAGE_LENGTH:DIGEST"``.  Every
shuffle after that moves slim records; the CLIP stage, the shard writer and
the ledger read the rest back by reference (``rehydrate``).

A segment is a data file (blobs appended, written straight to its final,
unique name) and an index (one JSON line per blob: uid and reference),
written complete-then-renamed after the data file is closed.  So an index
exists only for a complete segment, and what a killed run staged is found
again by listing indexes: a rerun restores those records (their digests
checked) instead of downloading them again.

The folder is named by a fingerprint of the settings that shape the staged
bytes and fields, so a rerun with other image or hash settings never reuses
them.  It is deleted when the run is marked finished.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from paircurate.transforms.files import write_atomically
from paircurate.transforms.schema import DECIDED_FIELDS, is_live

#: The folder under the output root that holds staging (kept when an unfinished run is resumed).
STAGING_DIR = "_staging"
DATA_SUFFIX = ".bin"
INDEX_SUFFIX = ".idx.jsonl"
#: What a staged record keeps: the decided fields, and the dedup signature (read right after
#: staging; dedup_slim drops it again before records cross dedup's join).
#: (DECIDED_FIELDS, from schema: the fields stages after staging decide or set, a slim
#: record's own, newer than its blob's.)
SLIM_FIELDS = DECIDED_FIELDS + ("image_sha256", "phash", "low_information", "near_signature",
                                "original_width", "original_height")
#: Fields never staged: bytes, and the reference itself.
_NOT_STAGED = ("image", "raw", "image_ref")


class StagingError(RuntimeError):
    """Staged bytes are missing or do not match their reference."""


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True)
class ImageRef:
    segment: str   # the segment's name (no folder): records stay small
    offset: int
    meta_length: int
    image_length: int
    digest: str    # of the whole blob

    def encode(self) -> str:
        return f"{self.segment}:{self.offset}:{self.meta_length}:{self.image_length}:{self.digest}"

    @classmethod
    def decode(cls, text: str) -> "ImageRef":
        segment, offset, meta, image, dig = text.rsplit(":", 4)
        return cls(segment, int(offset), int(meta), int(image), dig)


def slim(record: Dict[str, Any]) -> Dict[str, Any]:
    """The staged form of a record: SLIM_FIELDS only (the rest is in its blob)."""
    return {name: record.get(name) for name in SLIM_FIELDS}


def decided_only(record: Dict[str, Any]) -> Dict[str, Any]:
    """A staged record without its signature (in its blob): what dedup's join needs to move."""
    if not record.get("image_ref"):
        return record
    return {name: record.get(name) for name in DECIDED_FIELDS}


def rehydrate(record: Dict[str, Any], meta: Mapping[str, Any]) -> Dict[str, Any]:
    """A slim record made whole again: its blob's details, then its own (newer) decided fields."""
    full = dict(meta)
    full.update({name: record.get(name) for name in DECIDED_FIELDS})
    return full


def fingerprint(config) -> str:
    """Short hash of the settings that shape staged bytes and fields (image and hash settings)."""
    import dataclasses

    shaping = {"image": dataclasses.asdict(config.image),
               "hash": [config.dedup.hash, config.dedup.hash_size, config.dedup.min_information,
                        config.dedup.smooth_below, config.dedup.flips]}
    shaping["image"].pop("threads", None)  # how many threads resize does not change the bytes
    text = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


def staging_dir(root: str, config) -> str:
    return FileSystems.join(FileSystems.join(root, STAGING_DIR), fingerprint(config))


class SegmentWriter:
    """Appends image bytes to one segment at a time, rolling to a new one past the limits."""

    def __init__(self, folder: str, max_records: int, max_bytes: int):
        self._folder = folder
        self._max_records = max(1, max_records)
        self._max_bytes = max(1, max_bytes)
        self._handle = None
        self.closed_segments: List[str] = []

    def _open(self) -> None:
        self._name = uuid.uuid4().hex[:20]
        self._handle = FileSystems.create(FileSystems.join(self._folder, self._name + DATA_SUFFIX))
        self._offset = 0
        self._index: List[str] = []

    def stage(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Append the record's blob to the current segment; return the slim record that refers to it."""
        if self._handle is None:
            self._open()
        meta = {k: v for k, v in record.items() if k not in _NOT_STAGED}
        meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
        image = record["image"]
        blob = meta_bytes + image
        self._handle.write(blob)
        ref = ImageRef(self._name, self._offset, len(meta_bytes), len(image), digest(blob)).encode()
        self._offset += len(blob)
        self._index.append(json.dumps({"uid": record["uid"], "ref": ref}, sort_keys=True))
        if len(self._index) >= self._max_records or self._offset >= self._max_bytes:
            self.close()
        record["image_ref"] = ref
        return slim(record)

    def close(self) -> None:
        """Close the data file, then write its index complete-then-renamed (the commit point)."""
        if self._handle is None:
            return
        self._handle.close()
        final = FileSystems.join(self._folder, self._name + INDEX_SUFFIX)
        write_atomically(final, ("\n".join(self._index) + "\n").encode("utf-8"))
        self.closed_segments.append(self._name)
        self._handle = None


class StagedReader:
    """Reads staged bytes by reference, keeping a few segment files open (refs cluster by segment)."""

    def __init__(self, folder: str, open_files: int = 8):
        self._folder = folder
        self._open_files = open_files
        self._handles: Dict[str, Any] = {}

    def read(self, ref_text: str) -> Tuple[Dict[str, Any], bytes]:
        """(details, image bytes) of a staged record; StagingError if they are gone or damaged."""
        ref = ImageRef.decode(ref_text)
        handle = self._handles.get(ref.segment)
        if handle is None:
            if len(self._handles) >= self._open_files:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            path = FileSystems.join(self._folder, ref.segment + DATA_SUFFIX)
            try:
                handle = FileSystems.open(path, compression_type="uncompressed")
            except Exception as exc:  # noqa: BLE001 - any filesystem's "not there"
                raise StagingError(f"staged segment {path} cannot be opened: {exc}") from None
            self._handles[ref.segment] = handle
        handle.seek(ref.offset)
        blob = handle.read(ref.meta_length + ref.image_length)
        if len(blob) != ref.meta_length + ref.image_length or digest(blob) != ref.digest:
            raise StagingError(f"staged blob in {ref.segment} at {ref.offset} does not match its digest")
        return json.loads(blob[:ref.meta_length].decode("utf-8")), blob[ref.meta_length:]

    def rehydrate(self, record: Dict[str, Any], with_image: bool = False) -> Dict[str, Any]:
        """The whole record of a staged one (others unchanged); with its image bytes if asked."""
        if not record.get("image_ref"):
            return record
        meta, image = self.read(record["image_ref"])
        full = rehydrate(record, meta)
        full["image"] = image if with_image else None
        return full

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def image_bytes(record: Mapping[str, Any], reader: Optional[StagedReader]) -> Optional[bytes]:
    """The record's image bytes: carried (``image``) or staged (``image_ref``)."""
    if record.get("image"):
        return record["image"]
    ref = record.get("image_ref")
    if ref and reader is not None:
        return reader.read(ref)[1]
    return None


# --------------------------------------------------------------------------- resume

def list_indexes(folder: str) -> List[str]:
    """Index files of the complete segments in a staging folder ([] when there is none)."""
    try:
        if not FileSystems.exists(folder):
            return []
        pattern = FileSystems.join(folder, "*" + INDEX_SUFFIX)
        return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    except Exception:  # noqa: BLE001 - an unreadable staging folder is treated as empty
        return []


def read_index(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(uid, entry) of every image a complete segment holds."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        for line in handle.read().decode("utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                yield entry["uid"], entry


def restore(record: Dict[str, Any], entries: List[Dict[str, Any]],
            reader: StagedReader) -> Tuple[Dict[str, Any], bool]:
    """A live record whose blob a killed run staged becomes that slim record again (digest checked)."""
    if not entries or not is_live(record):
        return record, False
    for entry in entries:
        try:
            meta, _ = reader.read(entry["ref"])
        except StagingError:
            continue
        return slim(dict(meta, image_ref=entry["ref"])), True
    return record, False


# --------------------------------------------------------------------------- Beam

class _StageFn(beam.DoFn):
    def __init__(self, folder: str, max_records: int, max_bytes: int):
        self._folder = folder
        self._max_records = max_records
        self._max_bytes = max_bytes

    def setup(self):
        self._staged = beam.metrics.Metrics.counter("staging", "staged")
        self._bytes = beam.metrics.Metrics.counter("staging", "image_bytes")

    def start_bundle(self):
        self._writer = SegmentWriter(self._folder, self._max_records, self._max_bytes)

    def process(self, record):
        if is_live(record) and record.get("image"):
            self._bytes.inc(len(record["image"]))
            self._staged.inc()
            yield self._writer.stage(record)
        else:
            yield record

    def finish_bundle(self):
        self._writer.close()


class StageImages(beam.PTransform):
    """records -> records whose details and image bytes are in staging segments (slim, ``image_ref``)."""

    def __init__(self, folder: str, max_records: int, max_bytes: int):
        super().__init__()
        self._fn = _StageFn(folder, max_records, max_bytes)

    def expand(self, records):
        return records | "Stage" >> beam.ParDo(self._fn)


class _RehydrateFn(beam.DoFn):
    def __init__(self, folder: str, live_only: bool, with_image: bool = False):
        self._folder = folder
        self._live_only = live_only
        self._with_image = with_image

    def setup(self):
        self._reader = StagedReader(self._folder)

    def process(self, record):
        if self._live_only and not is_live(record):
            yield record
        else:
            yield self._reader.rehydrate(record, self._with_image)

    def teardown(self):
        if getattr(self, "_reader", None) is not None:
            self._reader.close()


class Rehydrate(beam.PTransform):
    """Slim staged records -> whole records (image bytes only ``with_image``); others pass unchanged.

    With image bytes, the next steps must be fused with this one (no shuffle, no
    side-input wait) and drop them again: they are what staging keeps out of shuffles.
    """

    def __init__(self, folder: str, live_only: bool = False, with_image: bool = False):
        super().__init__()
        self._fn = _RehydrateFn(folder, live_only, with_image)

    def expand(self, records):
        return records | "Rehydrate" >> beam.ParDo(self._fn)


class Slim(beam.PTransform):
    """Whole records with a staging reference -> slim again (after a stage that needed details)."""

    def expand(self, records):
        return records | "Slim" >> beam.Map(decided_only)


class _RestoreFn(beam.DoFn):
    def __init__(self, folder: str):
        self._folder = folder

    def setup(self):
        self._reader = StagedReader(self._folder)
        self._resumed = beam.metrics.Metrics.counter("staging", "resumed_rows")

    def process(self, element):
        _, groups = element
        entries = list(groups["staged"])
        for record in groups["record"]:
            record, restored = restore(record, entries, self._reader)
            if restored:
                self._resumed.inc()
            yield record

    def teardown(self):
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()


class RestoreStaged(beam.PTransform):
    """Live records whose images a killed run already staged get them back, so they are not fetched.

    ``indexes`` are the index files found when the graph was built.
    """

    def __init__(self, folder: str, indexes: List[str]):
        super().__init__()
        self._folder = folder
        self._indexes = list(indexes)

    def expand(self, records):
        from paircurate.transforms.beam_util import metered_cogroup

        live, done = records | "SplitLive" >> beam.Partition(lambda r, _: 0 if is_live(r) else 1, 2)
        staged = (records.pipeline
                  | "Indexes" >> beam.Create(self._indexes)
                  | "SpreadIndexes" >> beam.Reshuffle()
                  | "Entries" >> beam.FlatMap(read_index))
        keyed = live | "KeyByUid" >> beam.Map(lambda r: (r["uid"], r))
        restored = (metered_cogroup({"record": keyed, "staged": staged}, "JoinStaged")
                    | "Restore" >> beam.ParDo(_RestoreFn(self._folder)))
        return (restored, done) | "Merge" >> beam.Flatten()
