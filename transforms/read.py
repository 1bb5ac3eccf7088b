"""Reading URL + caption lists: Parquet, CSV, TSV, JSONL or plain text (each optionally .gz).

Inputs are planned into read tasks at graph-build time (file listing only) and
read by workers: Parquet by row group, uncompressed TXT/TSV/JSONL by byte range,
CSV and gzip files whole (quoted fields may span lines; gzip cannot seek).
Every row gets a position that is stable across runs (row index or the byte
offset of its line), from which its uid is derived.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from paircurate.config import InputConfig
from paircurate.schema import carried_name, new_record

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
             ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
#: How many JSONL records are looked at to learn the carried columns.
JSONL_SAMPLE = 1000
#: Ledger column for JSONL keys that the sample did not show (a JSON object).
JSONL_OVERFLOW = "input_extra_json"


class InputError(ValueError):
    """The input cannot be read as asked; the message says why."""


@dataclass(frozen=True)
class ReadTask:
    """A unit of reading: a whole file, a Parquet row group, or a byte range."""
    path: str
    source: str          # path relative to the input root: part of every uid
    fmt: str
    compressed: bool
    start: int = 0       # byte offset, or row group index for Parquet
    end: int = -1        # byte offset (exclusive); -1: to the end


def detect_format(path: str, configured: str = "auto") -> Tuple[str, bool]:
    """(format, gzip-compressed) of an input file, from its name unless configured."""
    name = path.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    if configured != "auto":
        return configured, compressed
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt, compressed
    raise InputError(f"cannot tell the format of {path!r} from its name; "
                     f"set input.format to one of {', '.join(FORMATS)}")


def list_input_files(pattern: str) -> Tuple[str, List[Tuple[str, int]]]:
    """(root, [(path, size)]) for a file, a glob or a folder, through Beam's FileSystems."""
    candidates = [pattern]
    if not any(ch in pattern for ch in "*?["):
        if FileSystems.exists(pattern) and not _is_file(pattern):
            candidates = [FileSystems.join(pattern, "**")]
    results = FileSystems.match(candidates)
    files = sorted((m.path, m.size_in_bytes) for r in results for m in r.metadata_list
                   if not os.path.basename(m.path).startswith((".", "_")))
    if not files:
        raise InputError(f"no input files match {pattern!r}")
    root = _common_root([p for p, _ in files], pattern)
    return root, files


def _is_file(path: str) -> bool:
    if "://" not in path:
        return os.path.isfile(path)
    # Object stores have no folders: a path that names an object is a file.
    if path.endswith("/"):
        return False
    match = FileSystems.match([path])[0].metadata_list
    return any(m.path == path for m in match)


def _common_root(paths: Sequence[str], pattern: str) -> str:
    if len(paths) == 1:
        return paths[0].rsplit("/", 1)[0] if "/" in paths[0] else ""
    return os.path.commonpath(paths) if "://" not in paths[0] else paths[0].rsplit("/", 1)[0]


def relative_source(path: str, root: str) -> str:
    rel = path[len(root):].lstrip("/") if root and path.startswith(root) else path
    return rel or os.path.basename(path)


def plan_reads(pattern: str, config: InputConfig) -> List[ReadTask]:
    """Split the input into read tasks (no row is read here, only file metadata)."""
    root, files = list_input_files(pattern)
    tasks: List[ReadTask] = []
    first: Optional[Tuple[str, str, List[str]]] = None  # (path, format, columns)
    for path, size in files:
        fmt, compressed = detect_format(path, config.format)
        source = relative_source(path, root)
        columns: List[str] = []
        if fmt == "parquet":
            with FileSystems.open(path) as handle:
                parquet = pq.ParquetFile(handle)
                groups = parquet.num_row_groups
                columns = parquet.schema_arrow.names
            tasks.extend(ReadTask(path, source, fmt, False, g, g + 1) for g in range(groups))
        elif fmt in ("csv", "tsv"):
            columns = header_of(path, fmt, compressed)
        # Every file must look like the first: the ledger has one schema.
        if first is None:
            first = (path, fmt, columns)
        elif fmt != first[1]:
            raise InputError(f"input files must share one format: {first[0]} is {first[1]}, "
                             f"{path} is {fmt}")
        elif columns != first[2]:
            raise InputError(f"input files must share their columns: {first[0]} has "
                             f"{', '.join(first[2])}; {path} has {', '.join(columns)}")
        if fmt in ("txt", "tsv", "jsonl") and not compressed and size > config.split_bytes:
            for start in range(0, size, config.split_bytes):
                tasks.append(ReadTask(path, source, fmt, False, start,
                                      min(start + config.split_bytes, size)))
        elif fmt != "parquet":  # Parquet's row-group tasks were added above
            tasks.append(ReadTask(path, source, fmt, compressed))
    return tasks


def _open_text(task: ReadTask) -> io.BufferedReader:
    handle = FileSystems.open(task.path, compression_type="uncompressed")
    if task.compressed:
        return io.BufferedReader(gzip.GzipFile(fileobj=handle))
    return handle


def iter_lines(task: ReadTask) -> Iterator[Tuple[int, bytes]]:
    """(byte offset, line) for the lines that start inside the task's range.

    A range reader skips the partial line it starts in (the previous range
    owns it) and reads past its end to finish its last line.
    """
    handle = _open_text(task)
    try:
        offset = 0
        if task.start > 0:
            handle.seek(task.start - 1)
            offset = task.start - 1
            skipped = handle.readline()  # ends the line that owns byte start-1
            offset += len(skipped)
        for line in handle:
            if task.end >= 0 and offset >= task.end:
                break
            yield offset, line
            offset += len(line)
    finally:
        handle.close()


def header_of(path: str, fmt: str, compressed: bool) -> List[str]:
    """Column names of a CSV/TSV file (its first line)."""
    handle = _open_text(ReadTask(path, "", fmt, compressed))
    try:
        first = handle.readline().decode("utf-8-sig")
    finally:
        handle.close()
    delimiter = "\t" if fmt == "tsv" else ","
    return next(csv.reader([first], delimiter=delimiter), [])


def iter_rows(task: ReadTask) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(position, row) of every input row in a task."""
    if task.fmt == "parquet":
        with FileSystems.open(task.path) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read_row_group(task.start)
            # The group's first row number, from the footer already read: positions are file-global.
            base = sum(parquet.metadata.row_group(g).num_rows for g in range(task.start))
        for i, row in enumerate(table.to_pylist()):
            yield base + i, row
    elif task.fmt == "csv":
        handle = io.TextIOWrapper(_open_text(task), encoding="utf-8-sig", newline="")
        try:
            reader = csv.DictReader(handle)
            for i, row in enumerate(reader):
                yield i, row
        finally:
            handle.close()
    elif task.fmt == "tsv":
        columns = header_of(task.path, "tsv", task.compressed)
        for offset, line in iter_lines(task):
            if offset == 0:
                continue  # the header
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text:
                continue
            values = next(csv.reader([text], delimiter="\t"), [])
            yield offset, _zip_row(columns, values)
    elif task.fmt == "jsonl":
        for offset, line in iter_lines(task):
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = {"__invalid__": "not valid JSON"}
            if not isinstance(value, dict):
                value = {"__invalid__": "not a JSON object"}
            yield offset, value
    elif task.fmt == "txt":
        for offset, line in iter_lines(task):
            text = line.decode("utf-8", errors="replace").strip()
            if text:
                yield offset, {"url": text}
    else:  # pragma: no cover - plan_reads only makes known formats
        raise InputError(f"unknown format {task.fmt}")


def _zip_row(columns: Sequence[str], values: Sequence[str]) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(zip(columns, values))
    if len(values) != len(columns):
        row["__invalid__"] = f"expected {len(columns)} fields, got {len(values)}"
    return row


def make_uid(source: str, position: int, url: Any, caption: Any) -> str:
    """Stable id of an input row: its file, its position there and its content."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (source, str(position), repr(url), repr(caption)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def carried_columns(tasks: Sequence[ReadTask], config: InputConfig) -> pa.Schema:
    """The input columns carried into the ledger, with their Arrow types.

    Parquet keeps its own types; CSV/TSV columns are strings; JSONL columns are
    learnt from the first records of the first file (strings stay strings,
    other values are carried as their JSON text).
    """
    if not tasks:
        return pa.schema([])
    first = tasks[0]
    core = {config.url_col, config.caption_col}
    if first.fmt == "parquet":
        with FileSystems.open(first.path) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        fields = [pa.field(carried_name(f.name), f.type) for f in schema if f.name not in core]
    elif first.fmt in ("csv", "tsv"):
        fields = [pa.field(carried_name(c), pa.string())
                  for c in header_of(first.path, first.fmt, first.compressed) if c not in core]
    elif first.fmt == "jsonl":
        names: List[str] = []
        sample_task = ReadTask(first.path, first.source, first.fmt, first.compressed)
        for i, (_, row) in enumerate(iter_rows(sample_task)):
            if i >= JSONL_SAMPLE:
                break
            names.extend(k for k in row if k not in names and k not in core and k != "__invalid__")
        fields = [pa.field(carried_name(n), pa.string()) for n in names]
        # Keys first seen after the sample are not lost: they go here as one JSON object.
        fields.append(pa.field(JSONL_OVERFLOW, pa.string()))
    else:
        fields = []
    return pa.schema(fields)


def to_record(task: ReadTask, position: int, row: Dict[str, Any], config: InputConfig,
              carried: Sequence[str], text_carried: bool) -> Dict[str, Any]:
    """An input row as a pipeline record (validation comes later)."""
    url = row.get(config.url_col)
    caption = row.get(config.caption_col) if task.fmt != "txt" else None
    extra: Dict[str, Any] = {}
    overflow: Dict[str, Any] = {}
    for name, value in row.items():
        if name in (config.url_col, config.caption_col):
            continue
        if name == "__invalid__":
            extra[name] = value
            continue
        target = carried_name(name)
        if target not in carried:
            if text_carried:
                overflow[name] = value
            continue
        if text_carried and value is not None and not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False, sort_keys=True)
        extra[target] = value
    if overflow:
        extra[JSONL_OVERFLOW] = json.dumps(overflow, ensure_ascii=False, sort_keys=True)
    if config.url_col not in row and "__invalid__" not in extra:
        extra["__invalid__"] = f"no column {config.url_col!r}"
    uid = make_uid(task.source, position, url, caption)
    return new_record(uid, url, caption, task.source, position, extra)


class _ReadTaskFn(beam.DoFn):
    def __init__(self, config: InputConfig, carried: Sequence[str], text_carried: bool):
        self._config = config
        self._carried = list(carried)
        self._text_carried = text_carried

    def setup(self):
        self._rows = beam.metrics.Metrics.counter("read", "rows")

    def process(self, task: ReadTask):
        for position, row in iter_rows(task):
            self._rows.inc()
            yield to_record(task, position, row, self._config, self._carried, self._text_carried)


class ReadInput(beam.PTransform):
    """Input files -> records; read tasks are spread over workers by a reshuffle."""

    def __init__(self, tasks: Sequence[ReadTask], config: InputConfig, carried: pa.Schema):
        super().__init__()
        self._tasks = list(tasks)
        self._config = config
        self._carried = [f.name for f in carried]
        self._text_carried = bool(self._tasks) and self._tasks[0].fmt == "jsonl"

    def expand(self, pbegin):
        return (pbegin
                | "Tasks" >> beam.Create(self._tasks)
                | "Spread" >> beam.Reshuffle()
                | "Rows" >> beam.ParDo(_ReadTaskFn(self._config, self._carried, self._text_carried)))
