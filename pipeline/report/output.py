"""Reading a finished output folder back: stats.json, the Parquet ledger, samples from the shards.

Everything goes through Beam's FileSystems, so gs:// and s3:// outputs work like
local ones.  The ledger is streamed batch by batch, reading only the columns
asked for; image bytes come from a bounded sample of shard members (tar streams
read from the start and abandoned early), never from all shards.  A damaged file
is a ReportError naming it.
"""
from __future__ import annotations

import collections
import json
import tarfile
import zlib
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from paircurate.report.text import printable
from paircurate.transforms.files import IMAGE_EXTENSIONS, iter_shard, read_json

BATCH_ROWS = 65536
KEPT_SAMPLES = 24
MAX_SHARD_SCANS = 3


class ReportError(ValueError):
    """The folder cannot be reported on or inspected as asked; the message says why."""


def join(root: str, *parts: str) -> str:
    return FileSystems.join(root, *parts)


def ledger_files(root: str) -> List[str]:
    matched = FileSystems.match([join(root, "metadata", "*.parquet")])[0].metadata_list
    files = sorted(m.path for m in matched)
    if not files:
        raise ReportError(f"{root} is not a paircurate output folder: no metadata/*.parquet ledger")
    return files


#: What reading a damaged Parquet file or tar raises (pyarrow's errors are ArrowException,
#: ValueError or OSError; gzip's BadGzipFile is an OSError).
DAMAGED = (pa.ArrowException, ValueError, OSError, EOFError, tarfile.TarError, zlib.error)


def unreadable(path: str, what: str, exc: BaseException) -> ReportError:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ReportError(f"{path}: not a readable {what} ({printable(detail)[:200]})")


def ledger_schema(root: str) -> pa.Schema:
    path = ledger_files(root)[0]
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except DAMAGED as exc:
        raise unreadable(path, "Parquet ledger file", exc) from None


def iter_ledger(root: str, columns: Sequence[str], batch_rows: int = BATCH_ROWS
                ) -> Iterator[pa.Table]:
    """The ledger as tables of at most ``batch_rows`` rows holding only ``columns``.

    A damaged ledger file is a ReportError naming the file."""
    for path in ledger_files(root):
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                parquet = pq.ParquetFile(handle)
                present = set(parquet.schema_arrow.names)
                batches = parquet.iter_batches(batch_size=batch_rows,
                                               columns=[c for c in columns if c in present])
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    table = pa.Table.from_batches([batch])
                    for name in columns:  # a column an older ledger lacks reads as nulls
                        if name not in present:
                            table = table.append_column(name, pa.nulls(len(table), pa.string()))
                    yield table
        except DAMAGED as exc:
            raise unreadable(path, "Parquet ledger file", exc) from None


def read_stats(root: str) -> Dict[str, Any]:
    path = join(root, "stats.json")
    if not FileSystems.exists(path):
        raise ReportError(f"{root} has no stats.json: not a finished paircurate output")
    try:
        stats = read_json(path)
    except ValueError as exc:  # not UTF-8, not JSON
        raise unreadable(path, "stats file", exc) from None
    if not isinstance(stats, dict):
        raise ReportError(f"{path}: not a readable stats file (expected a JSON object)")
    return stats


def shard_files(root: str) -> List[str]:
    matched = FileSystems.match([join(root, "shards", "*.tar")])[0].metadata_list
    return sorted(m.path for m in matched)


def sample_from_members(key: str, members: Mapping[str, bytes]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except ValueError:
            meta = {}
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else meta.get("caption")
    return {"key": key, "image": image, "caption": caption, "clip_score": meta.get("clip_score"),
            "url": meta.get("url")}


def read_samples(root: str, kept: int = KEPT_SAMPLES, wanted: Mapping[str, str] = (),
                 max_shards: int = MAX_SHARD_SCANS) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """The first ``kept`` samples of the shards in name order, and the samples of ``wanted`` keys.

    ``wanted`` maps key -> shard name (from the ledger); keys in more than ``max_shards``
    shards are left out.  Every shard is read only as far as needed.
    """
    by_name = {p.rsplit("/", 1)[-1].rsplit(".", 1)[0]: p for p in shard_files(root)}
    pending: Dict[str, set] = collections.defaultdict(set)
    for key, shard in sorted(dict(wanted).items(), key=lambda kv: kv[1]):
        if shard in by_name and (shard in pending or len(pending) < max_shards):
            pending[shard].add(key)
    first: List[Dict[str, Any]] = []
    found: Dict[str, Dict[str, Any]] = {}
    for name in list(pending) + [n for n in sorted(by_name) if n not in pending]:
        keys = pending.get(name, set())
        if not keys and len(first) >= kept:
            break
        try:
            for key, members in iter_shard(by_name[name]):
                if len(first) < kept:
                    first.append(sample_from_members(key, members))
                if key in keys:
                    found[key] = sample_from_members(key, members)
                    keys.discard(key)
                if not keys and len(first) >= kept:
                    break
        except DAMAGED as exc:
            raise unreadable(by_name[name], "shard (tar)", exc) from None
    return first, found
