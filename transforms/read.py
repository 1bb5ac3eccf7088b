"""Reading URL + caption lists: Parquet, CSV, TSV, JSONL or plain text (each optionally .gz).

Inputs are planned into read tasks at graph-build time (file metadata, headers
and a gzip integrity pass) and read by workers: Parquet by row group,
uncompressed TXT/TSV/JSONL by byte range, CSV and gzip files whole (quoted
fields may span lines; gzip cannot seek). Every row gets a position that is
stable across runs (row index or the byte offset of its line), from which its
uid is derived. A bad row is read as a row marked ``__invalid__`` (validation
makes it invalid_input); a bad file is an InputError naming it.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from paircurate.transforms.schema import carried_name, new_record
from paircurate.transforms.settings import AT_LEAST_ONE, setting


@dataclass
class InputConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    # auto | parquet | csv | tsv | jsonl | txt (auto: from the file name)
    format: str = setting("auto", choices=("auto", "parquet", "csv", "tsv", "jsonl", "txt"))
    # Text inputs (txt, tsv, jsonl) are split into byte ranges of this size so
    # that several workers read one large file.
    split_bytes: int = setting(64 * 1024 * 1024, AT_LEAST_ONE)


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
    rows: int = -1       # rows in a Parquet row group (from the footer); -1: unknown
    size: int = -1       # bytes of a text task (its range, or the whole file); -1: unknown


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
    """Split the input into read tasks (no row is read here, only file metadata).

    Every file is opened (gzip files are decompressed once through): a file
    that cannot be read (not Parquet, corrupt or truncated gzip, a header that
    is not UTF-8) is an InputError naming it, before any work starts.
    """
    root, files = list_input_files(pattern)
    formats = {path: detect_format(path, config.format) for path, _ in files}
    check_gzip_files([path for path, (fmt, compressed) in formats.items() if compressed and fmt != "parquet"])
    tasks: List[ReadTask] = []
    first: Optional[Tuple[str, str, List[str]]] = None  # (path, format, columns)
    first_schema: Optional[pa.Schema] = None
    for path, size in files:
        fmt, compressed = formats[path]
        source = relative_source(path, root)
        columns: List[str] = []
        schema: Optional[pa.Schema] = None
        if fmt == "parquet":
            group_rows, schema = parquet_layout(path)
            columns = schema.names
            tasks.extend(ReadTask(path, source, fmt, False, g, g + 1, rows=n) for g, n in enumerate(group_rows))
        if fmt in ("csv", "tsv"):
            columns = header_of(path, fmt, compressed)
        # Every file must look like the first: the ledger has one schema.
        if first is None:
            first, first_schema = (path, fmt, columns), schema
        elif fmt != first[1]:
            raise InputError(f"input files must share one format: {first[0]} is {first[1]}, "
                             f"{path} is {fmt}")
        elif columns != first[2]:
            raise InputError(f"input files must share their columns: {first[0]} has "
                             f"{', '.join(first[2])}; {path} has {', '.join(columns)}")
        elif schema is not None and first_schema is not None:
            check_same_types(first[0], first_schema, path, schema)
        if fmt in ("txt", "tsv", "jsonl") and not compressed and size > config.split_bytes:
            for start in range(0, size, config.split_bytes):
                end = min(start + config.split_bytes, size)
                tasks.append(ReadTask(path, source, fmt, False, start, end, size=end - start))
        elif fmt != "parquet":  # Parquet's row-group tasks were added above
            tasks.append(ReadTask(path, source, fmt, compressed, size=size))
    return tasks


def parquet_layout(path: str) -> Tuple[List[int], pa.Schema]:
    """(rows of each row group, Arrow schema) of a Parquet file, from its footer."""
    try:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            meta = parquet.metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None


def check_same_types(first_path: str, first: pa.Schema, path: str, schema: pa.Schema) -> None:
    """Parquet files with the same column names must give them the same types (one ledger schema)."""
    for field in schema:
        expected = first.field(field.name).type
        if field.type != expected:
            raise InputError(f"input files must share their column types: column {field.name!r} is "
                             f"{expected} in {first_path} and {field.type} in {path}")


_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
#: Files checked at once when the input is planned (zlib works outside the GIL).
GZIP_CHECK_THREADS = 8


def check_gzip(path: str) -> None:
    """Decompress a whole gzip file: a corrupt or truncated one fails here, named, before any work.

    It costs one pass of decompression (about half a second per million rows
    of a JSONL list on one core), small next to reading the rows in the pipeline.
    """
    try:
        with FileSystems.open(path, compression_type="uncompressed") as raw:
            with gzip.GzipFile(fileobj=raw) as handle:
                while handle.read(1 << 20):
                    pass
    except _GZIP_ERRORS as exc:
        raise InputError(f"{path} is not a readable gzip file ({exc}): the file is corrupt or "
                         f"truncated; repair or remove it and run again") from None


def check_gzip_files(paths: Sequence[str]) -> None:
    """check_gzip for many files, a few at a time; the first bad file in order is reported."""
    if not paths:
        return
    with ThreadPoolExecutor(min(GZIP_CHECK_THREADS, len(paths))) as pool:
        for _ in pool.map(check_gzip, paths):
            pass


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
    try:
        handle = _open_text(ReadTask(path, "", fmt, compressed))
        try:
            first = handle.readline().decode("utf-8-sig")
        finally:
            handle.close()
    except UnicodeDecodeError:
        raise InputError(f"{path}: the header (first line) is not UTF-8 text") from None
    except _GZIP_ERRORS as exc:
        raise InputError(f"{path} cannot be read: {exc}") from None
    if "\r" in first.rstrip("\r\n"):
        # Old Mac line ends: lines are split on LF only, so the whole file would be one header.
        raise InputError(f"{path}: lines end in a bare CR; convert the file to LF or CRLF line ends")
    delimiter = "\t" if fmt == "tsv" else ","
    try:
        return next(csv.reader([first], delimiter=delimiter), [])
    except csv.Error as exc:
        raise InputError(f"{path}: the header (first line) is not valid {fmt.upper()}: {exc}") from None


def decode_line(raw: bytes, errors: str = "backslashreplace") -> Tuple[str, bool]:
    """(text, is UTF-8) of an input line; bytes that are not UTF-8 stay visible (\\xe9 escapes)."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors=errors), False


def _field_problem(exc: csv.Error) -> str:
    if "field limit" in str(exc):
        return f"a field is longer than {csv.field_size_limit()} characters"
    return f"not valid CSV: {exc}"


class _Lines:
    """The physical lines under a csv.reader, remembered so that each record knows its lines.

    Lines are decoded with surrogateescape, so bytes that are not UTF-8 never
    stop the reader: the record they are in is marked instead.
    """

    def __init__(self, handle):
        self._handle = handle
        self.number = 0
        self.at_end = False
        self.taken: List[Tuple[int, str, bool]] = []  # (line number, text, is UTF-8)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self._handle.readline()
        if not raw:
            self.at_end = True
            raise StopIteration
        if self.number == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        self.number += 1
        try:
            text, utf8 = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            text, utf8 = raw.decode("utf-8", errors="surrogateescape"), False
        self.taken.append((self.number, text, utf8))
        return text


def _visible(field: str) -> str:
    """A field read with surrogateescape, with its non-UTF-8 bytes shown as \\xNN."""
    return field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def ends_inside_quotes(text: str, delimiter: str = ",") -> bool:
    """True when a quoted field opened in ``text`` is still open at its end (csv's rules)."""
    if '"' not in text:
        return False
    at_start, quoted, i = True, False, 0
    while i < len(text):
        char = text[i]
        if quoted:
            if char == '"':
                if text[i + 1:i + 2] == '"':
                    i += 1  # a doubled quote inside quotes
                else:
                    quoted, at_start = False, False
        elif char == '"' and at_start:
            quoted = True
        else:
            at_start = char == delimiter or char in "\r\n"
        i += 1
    return quoted


def _parses_strictly(lines: Sequence[str], delimiter: str) -> bool:
    try:
        return len(list(csv.reader(lines, delimiter=delimiter, strict=True))) == 1
    except csv.Error:
        return False


CsvRecord = Tuple[int, Optional[List[str]], Optional[str]]  # (line number, fields, problem)


def _one_line(number: int, text: str, utf8: bool, delimiter: str, fields: Optional[List[str]] = None,
              error: Optional[csv.Error] = None, may_be_open: bool = True) -> List[CsvRecord]:
    """The record of one physical line: fields (None if unparsable) and its problem, if any.

    ``may_be_open`` False skips the quote scan: csv.reader ends a record on a
    line end inside quotes only when the file ends there.
    """
    if fields is None and error is None:
        try:
            fields = next(csv.reader([text], delimiter=delimiter), [])
        except csv.Error as exc:
            error = exc
    if error is not None:
        return [(number, None, _field_problem(error))]
    assert fields is not None
    if not fields:
        return []  # a blank line
    fields = fields if utf8 else [_visible(f) for f in fields]
    if may_be_open and ends_inside_quotes(text, delimiter):
        return [(number, fields, f"unbalanced quote (line {number})")]
    return [(number, fields, None if utf8 else "not UTF-8")]


def iter_csv_records(handle, delimiter: str = ",") -> Iterator[CsvRecord]:
    """(line number, fields, problem) of every record of a CSV file; nothing is swallowed.

    The first record is the header. Quoted fields may span lines, but a record
    that spans lines is kept whole only if it parses as strict CSV with as many
    fields as the header; otherwise its lines are read one by one and the line
    with the open quote is marked (a stray quote that never closes would
    otherwise swallow every row after it). A field over csv's size limit marks
    its record and reading goes on with the next line; bytes that are not UTF-8
    mark their record.
    """
    lines = _Lines(handle)
    reader = csv.reader(lines, delimiter=delimiter)
    width: Optional[int] = None  # the header's, once read
    while True:
        lines.taken = []
        error: Optional[csv.Error] = None
        try:
            fields: Optional[List[str]] = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            fields, error = None, exc
        taken = lines.taken
        if width is None and fields:
            width = len(fields)
        if len(taken) == 1:
            yield from _one_line(*taken[0], delimiter, fields, error, may_be_open=lines.at_end)
            continue
        texts = [text for _, text, _ in taken]
        whole = (error is None and fields is not None and (width is None or len(fields) == width)
                 and not ends_inside_quotes("".join(texts), delimiter)
                 and _parses_strictly(texts, delimiter))
        if whole:
            assert fields is not None
            utf8 = all(ok for _, _, ok in taken)
            yield taken[0][0], fields if utf8 else [_visible(f) for f in fields], \
                None if utf8 else "not UTF-8"
            continue
        for number, text, utf8 in taken:
            yield from _one_line(number, text, utf8, delimiter)


def iter_rows(task: ReadTask) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(position, row) of every input row in a task.

    A row that cannot be used as it is (not UTF-8, not JSON, a bad field count,
    an unbalanced quote, ...) is still yielded, with ``__invalid__`` saying why:
    validation marks it invalid_input, so it is never lost. A file that breaks
    off (corrupt gzip or Parquet data) is an InputError naming it.
    """
    count = 0
    try:
        for item in _iter_rows(task):
            count += 1
            yield item
    except (pa.ArrowException, *_GZIP_ERRORS) as exc:
        if task.fmt != "parquet" and not task.compressed:
            raise
        where = f"row group {task.start}" if task.fmt == "parquet" else f"row {count}"
        raise InputError(f"{task.path} cannot be read past {where} ({exc}): the file is corrupt "
                         f"or truncated; repair or remove it and run again") from None


def _iter_rows(task: ReadTask) -> Iterator[Tuple[int, Dict[str, Any]]]:
    if task.fmt == "parquet":
        with FileSystems.open(task.path) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read_row_group(task.start)
            # The group's first row number, from the footer already read: positions are file-global.
            base = sum(parquet.metadata.row_group(g).num_rows for g in range(task.start))
        for i, row in enumerate(parquet_rows(table)):
            yield base + i, row
    elif task.fmt == "csv":
        handle = _open_text(task)
        try:
            records = iter_csv_records(handle)
            header = next(records, (0, [], None))[1] or []
            for i, (_, fields, problem) in enumerate(records):
                row = _zip_row(header, fields) if fields is not None else {}
                if problem:
                    row["__invalid__"] = problem
                yield i, row
        finally:
            handle.close()
    elif task.fmt == "tsv":
        columns = header_of(task.path, "tsv", task.compressed)
        for offset, line in iter_lines(task):
            if offset == 0:
                continue  # the header
            text, utf8 = decode_line(line)
            text = text.rstrip("\r\n")
            if not text:
                continue
            try:
                values = next(csv.reader([text], delimiter="\t"), [])
            except csv.Error as exc:
                yield offset, {"__invalid__": _field_problem(exc)}
                continue
            row = _zip_row(columns, values)
            if not utf8:
                row["__invalid__"] = "not UTF-8"
            yield offset, row
    elif task.fmt == "jsonl":
        for offset, line in iter_lines(task):
            text, utf8 = decode_line(line, errors="replace")  # replacement characters keep it JSON
            text = text.strip()
            if not text:
                continue
            yield offset, _json_row(text, utf8)
    elif task.fmt == "txt":
        for offset, line in iter_lines(task):
            text, utf8 = decode_line(line)
            text = text.strip()
            if text:
                yield offset, {"url": text} if utf8 else {"url": text, "__invalid__": "not UTF-8"}
    else:  # pragma: no cover - plan_reads only makes known formats
        raise InputError(f"unknown format {task.fmt}")


def _json_row(text: str, utf8: bool) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"__invalid__": "not UTF-8" if not utf8 else "not valid JSON"}
    if not isinstance(value, dict):
        return {"__invalid__": "not a JSON object"}
    # JSON's \ud800 escapes decode to lone surrogates, which no coder or Parquet file takes.
    value, where = escape_surrogates(value)
    if not utf8:
        value["__invalid__"] = "not UTF-8"
    elif where is not None:
        value["__invalid__"] = f"{where!r} holds a lone surrogate (\\ud800-\\udfff), not valid Unicode"
    return value


def escape_surrogates(value: Any, where: Optional[str] = None) -> Tuple[Any, Optional[str]]:
    """(value with lone surrogates in its strings written as \\udXXX, the first key that held one)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value, None
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8"), where or "value"
    if isinstance(value, list):
        found = None
        items = []
        for item in value:
            item, bad = escape_surrogates(item, where)
            items.append(item)
            found = found or bad
        return items, found
    if isinstance(value, dict):
        found = None
        out: Dict[str, Any] = {}
        for key, item in value.items():
            key, bad_key = escape_surrogates(key, where)
            bad_key = bad_key and (where or key)  # a bad key is named by its escaped self
            item, bad = escape_surrogates(item, where or key)
            out[key] = item
            found = found or bad_key or bad
        return out, found
    return value, None


def parquet_rows(table: pa.Table) -> List[Dict[str, Any]]:
    """A row group's rows; string values that are not UTF-8 mark their row instead of failing it."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    columns: Dict[str, List[Any]] = {}
    bad: set = set()
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            values = []
            raw_values = pa.chunked_array([c.view(binary) for c in column.chunks], binary)
            for i, raw in enumerate(raw_values.to_pylist()):
                if raw is None:
                    values.append(None)
                    continue
                text, utf8 = decode_line(raw)
                if not utf8:
                    bad.add(i)
                values.append(text)
            columns[name] = values
        else:
            columns[name] = column.to_pylist()
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else []
    for i in bad:
        rows[i]["__invalid__"] = "not UTF-8"
    return rows


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


#: Rows between two progress reports of the bytes a text task has read.
_BYTES_EVERY = 1024


def offsets_are_bytes(task: ReadTask) -> bool:
    """True when a task's row positions are byte offsets in its file (uncompressed TXT, TSV, JSONL)."""
    return task.fmt in ("txt", "tsv", "jsonl") and not task.compressed


class _ReadTaskFn(beam.DoFn):
    def __init__(self, config: InputConfig, carried: Sequence[str], text_carried: bool,
                 progress: Optional[str] = None):
        self._config = config
        self._carried = list(carried)
        self._text_carried = text_carried
        self._progress_dir = progress

    def setup(self):
        from paircurate.transforms.tally import tally

        self._rows = beam.metrics.Metrics.counter("read", "rows")
        self._tally = tally(self._progress_dir)

    def process(self, task: ReadTask):
        progress = self._tally
        if progress is None:
            for position, row in iter_rows(task):
                self._rows.inc()
                yield to_record(task, position, row, self._config, self._carried, self._text_carried)
            return
        # Progress: rows as they are read; bytes (text inputs, for the ETA) every
        # _BYTES_EVERY rows where positions are offsets, else when the task ends.
        by_offset, start, reported, pending = offsets_are_bytes(task), max(task.start, 0), 0, 0
        for position, row in iter_rows(task):
            self._rows.inc()
            pending += 1
            if pending == _BYTES_EVERY:
                progress.add("read/rows", pending)
                pending = 0
                if by_offset and task.size >= 0:
                    progress.add("read/bytes", position - start - reported)
                    reported = position - start
            yield to_record(task, position, row, self._config, self._carried, self._text_carried)
        progress.add("read/rows", pending)
        if task.size >= 0:
            progress.add("read/bytes", task.size - reported)


class ReadInput(beam.PTransform):
    """Input files -> records; read tasks are spread over workers by a reshuffle."""

    def __init__(self, tasks: Sequence[ReadTask], config: InputConfig, carried: pa.Schema,
                 progress: Optional[str] = None):
        super().__init__()
        self._progress = progress
        self._tasks = list(tasks)
        self._config = config
        self._carried = [f.name for f in carried]
        self._text_carried = bool(self._tasks) and self._tasks[0].fmt == "jsonl"

    def expand(self, pbegin):
        return (pbegin
                | "Tasks" >> beam.Create(self._tasks)
                | "Spread" >> beam.Reshuffle()
                | "Rows" >> beam.ParDo(_ReadTaskFn(self._config, self._carried, self._text_carried,
                                                    self._progress)))
