"""Writers: sequentially numbered WebDataset shards, the Parquet ledger, run summaries.

Shard numbering is a global step done with shuffles, not in one worker: kept
records are spread over rank groups (a hash bucket of the uid, then its first
two hex digits), each group's count goes into a small side input, and a
record's global position is its group's offset plus its rank inside the
group; the records then meet in their shard.  Both shuffles move slim, packed
records: image bytes and details stay in staging (transforms/staging.py)
until the tar is written.  Tar members are sorted and carry fixed metadata,
so identical input and responses give identical bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from paircurate.transforms.beam_util import metered, metered_group
from paircurate.transforms.files import write_atomically, write_json
from paircurate.transforms.schema import error_class, ledger_row, pack_record, unpack_record
from paircurate.transforms.settings import AT_LEAST_ONE, setting
from paircurate.transforms.staging import StagedReader, decided_only, image_bytes


@dataclass
class OutputConfig:
    samples_per_shard: int = setting(10000, AT_LEAST_ONE)
    report: bool = True
    # Staging segments (image bytes kept where they were made, see transforms/staging.py):
    # a segment is closed, and so becomes resumable, after this many images or bytes.
    staging_segment_records: int = setting(1000, AT_LEAST_ONE)
    staging_segment_bytes: int = setting(64 * 1024 * 1024, AT_LEAST_ONE)


#: Number of hash buckets used to rank kept samples (a bucket holds ~N/this uids).
RANK_BUCKETS = 1024
#: Fixed tar member metadata: 2000-01-01T00:00:00Z.
TAR_MTIME = 946684800
#: Ledger fields that go into each sample's {key}.json beside the carried columns.
SAMPLE_JSON_FIELDS = ("uid", "key", "url", "caption", "width", "height", "original_width",
                      "original_height", "sha256", "image_sha256", "phash", "clip_score",
                      "source", "position", "caption_language", "caption_language_score")


def shard_name(index: int) -> str:
    return f"{index:05d}"


def rank_bucket(uid: str) -> int:
    """Bucket of a uid (uids are uniform hex, so the prefix spreads evenly)."""
    return int(uid[:8], 16) % RANK_BUCKETS


def bucket_offsets(counts: Mapping[Any, int]) -> Dict[Any, int]:
    """Global position of each rank group's first sample (groups in ascending order)."""
    offsets, total = {}, 0
    for bucket in sorted(counts):
        offsets[bucket] = total
        total += counts[bucket]
    return offsets


def rank_group(uid: str) -> Tuple[int, str]:
    """The group a kept uid is ranked in: its bucket, then its first two hex digits.

    Groups sort in the global order (bucket, then uid), since the digits are a
    prefix of the uid; so positions are the same as ranking whole buckets, while
    a group holds about N / 262,144 records, which a worker sorts in memory.
    """
    return rank_bucket(uid), uid[:2]


def assign_shards(group, records: Iterable[Dict[str, Any]], offsets: Mapping[Any, int],
                  samples_per_shard: int) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(shard index, record with key and shard) for the records of one rank group, ranked by uid."""
    base = offsets[group]
    for rank, record in enumerate(sorted(records, key=lambda r: r["uid"])):
        shard = (base + rank) // samples_per_shard
        record["shard"] = shard_name(shard)
        record["key"] = record["uid"]
        yield shard, record


def shard_member(record: Mapping[str, Any]) -> bytes:
    """A numbered record as it crosses the shard grouping: packed, without its key and shard.

    Both are implied (the key is the uid, the shard the grouping key), so they
    need not cross: about 40 bytes a record.  unshard_member() restores them.
    """
    return pack_record({**record, "key": None, "shard": None})


def unshard_member(index: int, packed: bytes) -> Dict[str, Any]:
    """The record shard_member() packed, in shard ``index``."""
    record = unpack_record(packed)
    record["key"], record["shard"] = record["uid"], shard_name(index)
    return record


def sample_json(record: Mapping[str, Any], carried: Sequence[str]) -> bytes:
    meta = {name: record.get(name) for name in SAMPLE_JSON_FIELDS}
    extra = record.get("extra") or {}
    for name in carried:
        meta[name] = extra.get(name)
    meta.update(record.get("clip_columns") or {})  # tag_<name>, head_<name> of a scored sample
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def sample_members(record: Mapping[str, Any], carried: Sequence[str],
                   reader: Optional[StagedReader] = None) -> List[Tuple[str, bytes]]:
    """The tar members of one sample: image (carried or read from staging), caption, metadata."""
    key = record["key"]
    ext = record.get("image_format") or "jpg"
    return [(f"{key}.{ext}", image_bytes(record, reader)),
            (f"{key}.json", sample_json(record, carried)),
            (f"{key}.txt", (record.get("caption") or "").encode("utf-8"))]


class _HashingWriter(io.RawIOBase):
    """Passes writes through while counting bytes and computing sha256."""

    def __init__(self, target):
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self._target.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def write_tar(handle, members: Iterable[Tuple[str, bytes]]) -> Tuple[int, str]:
    """Write members (in the given order) as a deterministic tar; return (bytes, sha256)."""
    writer = _HashingWriter(handle)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return writer.size, writer.sha256.hexdigest()


def whole(record: Dict[str, Any], reader: Optional[StagedReader]) -> Dict[str, Any]:
    """A record as its sample is written: a staged one with its details and image bytes read back."""
    return reader.rehydrate(record, with_image=True) if reader is not None else record


def write_shard(shards_dir: str, index: int, records: Sequence[Dict[str, Any]],
                carried: Sequence[str], reader: Optional[StagedReader] = None) -> Dict[str, Any]:
    """Write one shard (complete, then renamed into place); return its manifest entry.

    Staged records may come slim: each is made whole (details and image, one
    read from staging) only as its sample is written, so neither a shard's
    bytes nor its records' details are ever all in memory.
    """
    name = shard_name(index) + ".tar"
    final = FileSystems.join(shards_dir, name)
    temp = FileSystems.join(shards_dir, f".{name}.incomplete")
    ordered = sorted(records, key=lambda r: r["key"])
    members = (m for record in ordered
               for m in sample_members(whole(record, reader), carried, reader))
    # A retried bundle rewrites the same bytes over the same name.
    size, digest = write_atomically(final, lambda handle: write_tar(handle, members), temp=temp)
    return {"name": name, "samples": len(ordered), "bytes": size, "sha256": digest}


def count_key(row: Mapping[str, Any]) -> Tuple[str, str]:
    return row["status"], error_class(row.get("error")) or ""


def summarise_counts(pairs: Iterable[Tuple[Tuple[str, str], int]]) -> Dict[str, Any]:
    """Per-status and per-(status, error class) counts from combined (key, n) pairs."""
    by_status: Dict[str, int] = {}
    errors: Dict[str, Dict[str, int]] = {}
    total = 0
    for (status, cls), n in pairs:
        by_status[status] = by_status.get(status, 0) + n
        total += n
        if cls:
            errors.setdefault(status, {})[cls] = errors.get(status, {}).get(cls, 0) + n
    return {"rows": total, "by_status": dict(sorted(by_status.items())),
            "errors": {s: dict(sorted(c.items())) for s, c in sorted(errors.items())}}


class _WriteShardFn(beam.DoFn):
    def __init__(self, shards_dir: str, carried: Sequence[str], staging: Optional[str]):
        self._dir = shards_dir
        self._carried = list(carried)
        self._staging = staging

    def setup(self):
        self._reader = StagedReader(self._staging) if self._staging else None

    def process(self, element):
        index, packed = element
        # Staged records stay slim here: write_shard reads each one's details and image as
        # the tar is written (a shard's whole records would be several KB each in memory).
        records = [unshard_member(index, values) for values in packed]
        entry = write_shard(self._dir, index, records, self._carried, self._reader)
        beam.metrics.Metrics.counter("write", "shards").inc()
        yield beam.pvalue.TaggedOutput("manifest", entry)
        for record in records:
            record["image"] = None
            # Staged records leave slim (the ledger reads their details back): on the
            # local runner the whole output waits in memory for the ledger's stage.
            yield decided_only(record)

    def teardown(self):
        if getattr(self, "_reader", None) is not None:
            self._reader.close()


class _RankFn(beam.DoFn):
    """A rank group's records -> (shard, packed record); the groups' offsets are computed once."""

    def __init__(self, samples_per_shard: int):
        self._per_shard = samples_per_shard

    def setup(self):
        self._offsets, self._counts_id = None, None

    def process(self, element, counts):
        if self._counts_id != id(counts):  # one side input per (global) window: sort it once
            self._offsets, self._counts_id = bucket_offsets(counts), id(counts)
        group, packed = element
        records = (unpack_record(values) for values in packed)
        for shard, record in assign_shards(group, records, self._offsets, self._per_shard):
            yield shard, shard_member(record)


class WriteShards(beam.PTransform):
    """Kept records -> shards on disk; returns (records with key/shard, manifest entries).

    Staged records come out slim, as they went in (with key and shard set); the
    ledger makes them whole again (graph.write_outputs).

    Two shuffles of slim (packed) records: by rank group, where each record
    gets its global position from the groups' counts (a small side input), and
    by shard.  Image bytes are read from ``staging`` (or carried, as in `score`).
    """

    def __init__(self, shards_dir: str, samples_per_shard: int, carried: Sequence[str],
                 staging: Optional[str] = None):
        super().__init__()
        self._dir = shards_dir
        self._per_shard = samples_per_shard
        self._carried = list(carried)
        self._staging = staging

    def expand(self, kept):
        per_shard = self._per_shard
        counts = (kept
                  | "GroupOne" >> beam.Map(lambda r: (rank_group(r["uid"]), 1))
                  | "CountGroups" >> beam.CombinePerKey(sum))
        counts = metered(counts, "GroupCounts")
        keyed = kept | "KeyByGroup" >> beam.Map(
            lambda r: (rank_group(r["uid"]), pack_record(decided_only(r))))
        by_shard = (metered_group(keyed, "GroupRanks")
                    | "Rank" >> beam.ParDo(_RankFn(per_shard), beam.pvalue.AsDict(counts))
                    )
        written = (metered_group(by_shard, "GroupShards")
                   | "WriteTar" >> beam.ParDo(_WriteShardFn(self._dir, self._carried, self._staging))
                   .with_outputs("manifest", main="records"))
        return written.records, written.manifest


def ledger_arrow_schema(carried_schema: pa.Schema, clip_columns: Sequence[str] = ()) -> pa.Schema:
    from paircurate.transforms.schema import ledger_schema

    return ledger_schema(carried_schema, clip_columns)


class _LedgerRowFn(beam.DoFn):
    """Record -> ledger row; with a progress folder, each row's status is tallied (paircurate.progress)."""

    def __init__(self, carried: Sequence[str], progress: Optional[str], clip_columns: Sequence[str] = ()):
        self._carried = list(carried)
        self._progress_dir = progress
        self._clip_columns = list(clip_columns)

    def setup(self):
        from paircurate.transforms.tally import tally

        self._tally = tally(self._progress_dir)

    def process(self, record):
        row = ledger_row(record, self._carried, self._clip_columns)
        if self._tally is not None:
            self._tally.add("ledger/" + str(row["status"]))
        yield row


class WriteLedger(beam.PTransform):
    """All records -> metadata/part-*.parquet (one row per input row) and counts.json.

    ``clip_columns``: the CLIP stage's columns (clip_tags.ledger_columns), after clip_score.
    """

    def __init__(self, metadata_dir: str, work_dir: str, carried_schema: pa.Schema,
                 progress: Optional[str] = None, clip_columns: Sequence[str] = ()):
        super().__init__()
        self._progress = progress
        self._metadata_dir = metadata_dir
        self._work_dir = work_dir
        self._schema = ledger_arrow_schema(carried_schema, clip_columns)
        self._carried = [f.name for f in carried_schema]
        self._clip_columns = list(clip_columns)

    def expand(self, records):
        carried = self._carried
        rows = records | "LedgerRow" >> beam.ParDo(_LedgerRowFn(carried, self._progress, self._clip_columns))
        rows | "Parquet" >> beam.io.WriteToParquet(
            FileSystems.join(self._metadata_dir, "part"), self._schema,
            file_name_suffix=".parquet", row_group_buffer_size=16 * 1024 * 1024)
        counts_path = FileSystems.join(self._work_dir, "counts.json")
        return (rows
                | "CountKey" >> beam.Map(lambda r: (count_key(r), 1))
                | "Count" >> beam.CombinePerKey(sum)
                | "AllCounts" >> beam.combiners.ToList()
                | "WriteCounts" >> beam.Map(lambda pairs: write_json(counts_path, summarise_counts(pairs))))


def write_manifest_entries(entries: Sequence[Mapping[str, Any]], path: str) -> None:
    write_json(path, sorted(entries, key=lambda e: e["name"]))


class WriteManifest(beam.PTransform):
    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, entries):
        path = self._path
        return (entries
                | "AllEntries" >> beam.combiners.ToList()
                | "WriteManifest" >> beam.Map(write_manifest_entries, path))
