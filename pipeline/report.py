"""The run report (OUT/report.html) and ledger inspection, from a finished output alone.

Everything is read back from what the run wrote -- stats.json, the Parquet
ledger and the shards -- through Beam's FileSystems, so gs:// and s3:// outputs
work like local ones.  The ledger is streamed batch by batch, reading only the
columns a figure needs; memory grows with the number of distinct statuses,
error classes and duplicate clusters, never with the number of rows.  Image
bytes come from a bounded sample of shard members (tar streams read from the
start and abandoned early), never from all shards.

The page is one self-contained file: thumbnails are base64 JPEGs, plots are
base64 PNGs drawn by matplotlib's Agg canvas (optional: without matplotlib
the page says so and keeps its tables), and a Content-Security-Policy forbids
any network load.  Figures that tests and monitoring read back carry
``data-*`` attributes.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import heapq
import html
import io
import json
import math
import re
import tarfile
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from paircurate.schema import STATUS_ORDER
from paircurate.transforms.write import IMAGE_EXTENSIONS, iter_shard, read_json

REPORT_NAME = "report.html"
#: Stage that gives each status, in STATUS_ORDER (the funnel's rows).
STAGE_OF_STATUS: Dict[str, str] = {
    "invalid_input": "validate",
    "caption_filtered": "caption prefilter",
    "language_filtered": "caption language",
    "duplicate_input": "input dedup",
    "fetch_failed": "fetch",
    "disallowed": "fetch (opt-out header)",
    "blocked_address": "fetch (address check)",
    "decode_failed": "decode/resize",
    "size_filtered": "decode/resize",
    "duplicate_exact": "exact image dedup",
    "duplicate_near": "near image dedup",
    "clip_filtered": "CLIP filter",
}
#: Statuses whose duplicate_of points at an image-dedup cluster representative.
IMAGE_DUPLICATE_STATUSES = ("duplicate_exact", "duplicate_near")
#: Bounds on what the page samples.
KEPT_SAMPLES = 24
CLIP_DROPPED_SAMPLES = 12  # this many just under the threshold, and as many at the bottom
CLUSTER_SAMPLES = 6
CLUSTER_MEMBERS = 8
MAX_SHARD_SCANS = 3
HISTOGRAM_BINS = 40
THUMBNAIL_PX = 160
BATCH_ROWS = 65536
#: Columns `paircurate inspect` prints unless told otherwise.
INSPECT_COLUMNS = ("uid", "url", "caption", "status", "error", "clip_score")


class ReportError(ValueError):
    """The folder cannot be reported on or inspected as asked; the message says why."""


# --------------------------------------------------------------------------- pure figures

def funnel(by_status: Mapping[str, int]) -> List[Dict[str, Any]]:
    """Rows removed per status, in pipeline order, and the rows remaining after each.

    Rows in = the sum of all counts; the last ``remaining`` equals the ok count.
    Statuses unknown to STATUS_ORDER (from a newer version) come last, before ok.
    """
    order = [s for s in STATUS_ORDER if s != "ok"]
    order += sorted(s for s in by_status if s not in STATUS_ORDER)
    remaining = sum(int(n) for n in by_status.values())
    steps = []
    for status in order:
        removed = int(by_status.get(status, 0))
        remaining -= removed
        steps.append({"stage": STAGE_OF_STATUS.get(status, status), "status": status,
                      "removed": removed, "remaining": remaining})
    return steps


def error_classes(errors: pa.Array) -> pa.Array:
    """error_class() over an Arrow column: the text before the first ':', trimmed."""
    head = pc.replace_substring_regex(errors, pattern=r"(?s):.*$", replacement="")
    return pc.utf8_trim_whitespace(head)


def percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def cluster_size_counts(duplicates_per_representative: Mapping[str, int]) -> Dict[int, int]:
    """{cluster size (representative + its duplicates): number of clusters}."""
    sizes = collections.Counter(n + 1 for n in duplicates_per_representative.values())
    return dict(sorted(sizes.items()))


def clip_threshold(clip_config: Mapping[str, Any], lowest_kept: Optional[float]
                   ) -> Tuple[Optional[float], str]:
    """The score threshold the run applied, and how it was set."""
    if clip_config.get("min_score") is not None:
        value = float(clip_config["min_score"])
        return value, f"clip.min_score = {value:g}"
    if clip_config.get("keep_fraction") is not None:
        label = f"clip.keep_fraction = {clip_config['keep_fraction']:g}"
        if lowest_kept is None:
            return None, label + " (nothing kept)"
        return lowest_kept, label + f"; lowest kept score {lowest_kept:.4f}"
    return None, "no CLIP filter (scores only)"


# --------------------------------------------------------------------------- reading the output

def _join(root: str, *parts: str) -> str:
    return FileSystems.join(root, *parts)


def ledger_files(root: str) -> List[str]:
    matched = FileSystems.match([_join(root, "metadata", "*.parquet")])[0].metadata_list
    files = sorted(m.path for m in matched)
    if not files:
        raise ReportError(f"{root} is not a paircurate output folder: no metadata/*.parquet ledger")
    return files


#: What reading a damaged Parquet file or tar raises (pyarrow's errors are ArrowException,
#: ValueError or OSError; gzip's BadGzipFile is an OSError).
_DAMAGED = (pa.ArrowException, ValueError, OSError, EOFError, tarfile.TarError, zlib.error)


def _unreadable(path: str, what: str, exc: BaseException) -> ReportError:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ReportError(f"{path}: not a readable {what} ({printable(detail)[:200]})")


def ledger_schema(root: str) -> pa.Schema:
    path = ledger_files(root)[0]
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except _DAMAGED as exc:
        raise _unreadable(path, "Parquet ledger file", exc) from None


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
        except _DAMAGED as exc:
            raise _unreadable(path, "Parquet ledger file", exc) from None


def read_stats(root: str) -> Dict[str, Any]:
    path = _join(root, "stats.json")
    if not FileSystems.exists(path):
        raise ReportError(f"{root} has no stats.json: not a finished paircurate output")
    try:
        stats = read_json(path)
    except ValueError as exc:  # not UTF-8, not JSON
        raise _unreadable(path, "stats file", exc) from None
    if not isinstance(stats, dict):
        raise ReportError(f"{path}: not a readable stats file (expected a JSON object)")
    return stats


def shard_files(root: str) -> List[str]:
    matched = FileSystems.match([_join(root, "shards", "*.tar")])[0].metadata_list
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
        except _DAMAGED as exc:
            raise _unreadable(by_name[name], "shard (tar)", exc) from None
    return first, found


def thumbnail(image: Optional[bytes], size: int = THUMBNAIL_PX) -> Optional[str]:
    """A data: URI of a small JPEG of ``image`` (None when it cannot be decoded)."""
    if not image:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=80)
    except Exception:  # a thumbnail is decoration; an odd image must not break the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- ledger summary

@dataclasses.dataclass
class LedgerSummary:
    rows: int = 0
    by_status: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: (status, error class) -> rows
    errors: Dict[Tuple[str, str], int] = dataclasses.field(default_factory=dict)
    scored: int = 0
    score_min: Optional[float] = None
    score_max: Optional[float] = None
    lowest_kept_score: Optional[float] = None
    #: image-dedup representative uid -> number of duplicates pointing at it
    duplicates_of: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: signal that found each image duplicate (duplicate_signal) -> rows
    duplicate_signals: Dict[str, int] = dataclasses.field(default_factory=dict)


def _merge_min(a: Optional[float], b: Any) -> Optional[float]:
    return b if a is None else (a if b is None else min(a, b))


def _merge_max(a: Optional[float], b: Any) -> Optional[float]:
    return b if a is None else (a if b is None else max(a, b))


def summarise_ledger(tables: Iterable[pa.Table]) -> LedgerSummary:
    """Counts per status and error class, score range, duplicate clusters (one pass)."""
    summary = LedgerSummary()
    by_status: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    duplicates: collections.Counter = collections.Counter()
    signals: collections.Counter = collections.Counter()
    for table in tables:
        summary.rows += len(table)
        status = table["status"]
        for row in table.group_by("status").aggregate([("status", "count")]).to_pylist():
            by_status[row["status"]] += row["status_count"]
        failed = table.filter(pc.is_valid(table["error"]))
        if len(failed):
            classes = pa.table({"status": failed["status"], "cls": error_classes(failed["error"])})
            for row in classes.group_by(["status", "cls"]).aggregate([("cls", "count")]).to_pylist():
                errors[(row["status"], row["cls"])] += row["cls_count"]
        scores = table["clip_score"]
        valid = pc.drop_null(scores)
        if len(valid):
            summary.scored += len(valid)
            bounds = pc.min_max(valid).as_py()
            summary.score_min = _merge_min(summary.score_min, bounds["min"])
            summary.score_max = _merge_max(summary.score_max, bounds["max"])
            kept = pc.drop_null(pc.filter(scores, pc.equal(status, "ok")))
            if len(kept):
                summary.lowest_kept_score = _merge_min(summary.lowest_kept_score,
                                                       pc.min(kept).as_py())
        is_dup = pc.is_in(status, value_set=pa.array(IMAGE_DUPLICATE_STATUSES))
        dups = table.filter(is_dup).select(["status", "error"])
        if len(dups):
            for row in dups.group_by(["status", "error"]).aggregate([("status", "count")]).to_pylist():
                signals[duplicate_signal(row["status"], row["error"])] += row["status_count"]
        reps = pc.drop_null(pc.filter(table["duplicate_of"], is_dup))
        if len(reps):
            for row in pa.table({"rep": reps}).group_by("rep").aggregate([("rep", "count")]).to_pylist():
                duplicates[row["rep"]] += row["rep_count"]
    summary.by_status = dict(by_status)
    summary.errors = dict(errors)
    summary.duplicates_of = dict(duplicates)
    summary.duplicate_signals = dict(signals)
    return summary


#: The signals an image duplicate can be found by, in the order the report lists them.
DUPLICATE_SIGNALS = ("exact", "phash", "smooth", "flip")


def duplicate_signal(status: str, error: Optional[str]) -> str:
    """Which signal found an image duplicate: exact, phash, smooth or flip (its ledger error says).

    ``near: exact copy of UID`` is an exact copy of a near duplicate: exact.
    Ledgers from before verification (``near: distance=N``) count as phash.
    """
    text = error or ""
    if status == "duplicate_exact" or text.startswith("near: exact copy of"):
        return "exact"
    word = text[len("near: "):].split(" ", 1)[0] if text.startswith("near: ") else ""
    return word if word in DUPLICATE_SIGNALS else "phash"


def largest_clusters(duplicates_of: Mapping[str, int], n: int = CLUSTER_SAMPLES) -> List[str]:
    """Representatives of the ``n`` largest clusters (ties: smallest uid)."""
    return [rep for rep, _ in heapq.nsmallest(n, duplicates_of.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclasses.dataclass
class LedgerDetails:
    #: bin edges and counts of kept / clip_filtered / other scored rows
    edges: List[float] = dataclasses.field(default_factory=list)
    hist: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    #: clip_filtered rows just under the threshold (highest scores) and at the bottom
    dropped_top: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    dropped_bottom: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    representatives: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    members: Dict[str, List[Dict[str, Any]]] = dataclasses.field(default_factory=dict)


def histogram_edges(low: float, high: float, bins: int = HISTOGRAM_BINS) -> List[float]:
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    step = (high - low) / bins
    return [low + i * step for i in range(bins)] + [high]


def _bin_counts(values: pa.Array, edges: Sequence[float]) -> List[int]:
    import numpy as np

    counts, _ = np.histogram(values.to_numpy(zero_copy_only=False), bins=np.asarray(edges))
    return counts.tolist()


def _keep_extreme(current: List[Dict[str, Any]], rows: List[Dict[str, Any]], n: int,
                  highest: bool) -> List[Dict[str, Any]]:
    key = (lambda r: (-r["clip_score"], r["uid"])) if highest else (lambda r: (r["clip_score"], r["uid"]))
    return sorted(current + rows, key=key)[:n]


def collect_details(tables: Iterable[pa.Table], summary: LedgerSummary,
                    representatives: Sequence[str], dropped: int = CLIP_DROPPED_SAMPLES,
                    members: int = CLUSTER_MEMBERS) -> LedgerDetails:
    """Second pass: score histogram, sample of CLIP-dropped rows, the chosen clusters' rows."""
    details = LedgerDetails()
    if summary.scored:
        details.edges = histogram_edges(summary.score_min, summary.score_max)
        details.hist = {k: [0] * HISTOGRAM_BINS for k in ("kept", "clip_filtered", "other")}
    reps = pa.array(list(representatives), pa.string())
    for table in tables:
        status = table["status"]
        if summary.scored:
            groups = {"kept": pc.equal(status, "ok"), "clip_filtered": pc.equal(status, "clip_filtered")}
            groups["other"] = pc.invert(pc.or_(groups["kept"], groups["clip_filtered"]))
            for name, mask in groups.items():
                values = pc.drop_null(pc.filter(table["clip_score"], mask))
                if len(values):
                    counts = _bin_counts(values, details.edges)
                    details.hist[name] = [a + b for a, b in zip(details.hist[name], counts)]
            drop = table.filter(pc.and_(pc.equal(status, "clip_filtered"), pc.is_valid(table["clip_score"])))
            if len(drop):
                top = drop.take(pc.select_k_unstable(drop, dropped, [("clip_score", "descending")]))
                bottom = drop.take(pc.select_k_unstable(drop, dropped, [("clip_score", "ascending")]))
                cols = ["uid", "url", "caption", "clip_score", "error"]
                details.dropped_top = _keep_extreme(details.dropped_top, top.select(cols).to_pylist(), dropped, True)
                details.dropped_bottom = _keep_extreme(details.dropped_bottom, bottom.select(cols).to_pylist(), dropped, False)
        if len(reps):
            cols = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of"]
            for row in table.filter(pc.is_in(table["uid"], value_set=reps)).select(cols).to_pylist():
                details.representatives[row["uid"]] = row
            is_dup = pc.is_in(status, value_set=pa.array(IMAGE_DUPLICATE_STATUSES))
            of_rep = pc.and_(is_dup, pc.fill_null(pc.is_in(table["duplicate_of"], value_set=reps), False))
            for row in table.filter(of_rep).select(cols).to_pylist():
                bucket = details.members.setdefault(row["duplicate_of"], [])
                if len(bucket) < members:
                    bucket.append(row)
    return details


# --------------------------------------------------------------------------- plots (optional)

def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _png(figure, canvas_cls) -> str:
    canvas_cls(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def score_histogram_png(edges: Sequence[float], hist: Mapping[str, Sequence[int]],
                        threshold: Optional[float], threshold_label: str) -> Optional[str]:
    mpl = _matplotlib()
    if mpl is None:
        return None
    Figure, Canvas = mpl
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    bottom = [0] * len(widths)
    colours = {"kept": "#2b8a3e", "clip_filtered": "#c92a2a", "other": "#868e96"}
    labels = {"kept": "kept (ok)", "clip_filtered": "clip_filtered", "other": "other status"}
    for name in ("kept", "clip_filtered", "other"):
        counts = hist.get(name) or []
        if any(counts):
            ax.bar(edges[:-1], counts, width=widths, bottom=bottom, align="edge",
                   color=colours[name], label=labels[name], edgecolor="white", linewidth=0.3)
            bottom = [a + b for a, b in zip(bottom, counts)]
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=threshold_label)
    ax.set_xlabel("CLIP score (image-text cosine similarity)")
    ax.set_ylabel("pairs")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig, Canvas)


def cluster_sizes_png(sizes: Mapping[int, int]) -> Optional[str]:
    mpl = _matplotlib()
    if mpl is None or not sizes:
        return None
    Figure, Canvas = mpl
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    xs = sorted(sizes)
    ax.bar([str(x) for x in xs], [sizes[x] for x in xs], color="#1971c2")
    ax.set_xlabel("cluster size (representative + duplicates)")
    ax.set_ylabel("clusters")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig, Canvas)


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212529;margin:0;background:#f8f9fa}
header{background:#212529;color:#f8f9fa;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{color:#adb5bd;font-size:13px;word-break:break-all}
main{max-width:1180px;margin:0 auto;padding:8px 28px 40px}
nav{margin:14px 0;font-size:13px}
nav a{margin-right:14px;color:#1971c2;text-decoration:none}
section{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:4px 0 10px}
h3{font-size:14px;margin:14px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{background:#343a40;border-radius:6px;padding:10px 16px;min-width:120px}
.card .v{font-size:22px;font-weight:600}
.card .l{font-size:12px;color:#adb5bd}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e9ecef;vertical-align:top}
th{background:#f1f3f5;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.zero td{color:#adb5bd}
tr.total td{font-weight:600;border-top:2px solid #adb5bd}
.bar{background:#e9ecef;height:10px;border-radius:2px;min-width:120px}
.bar span{display:block;height:10px;background:#1971c2;border-radius:2px}
.bar.red span{background:#c92a2a}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.tile{border:1px solid #dee2e6;border-radius:4px;padding:6px;font-size:12px;background:#fff}
.tile img{display:block;width:160px;height:160px;object-fit:contain;background:#f1f3f5;margin:0 auto 4px}
.tile .score{color:#495057;font-variant-numeric:tabular-nums}
.noimg{width:160px;height:160px;display:flex;align-items:center;justify-content:center;background:#f1f3f5;color:#868e96;margin:0 auto 4px;text-align:center}
.clusters{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:0 20px}
.cluster{display:flex;gap:14px;border-top:1px solid #e9ecef;padding:10px 0;min-width:0}
.cluster .tile{flex:0 0 172px;box-sizing:border-box}
.cluster>div:last-child{min-width:0}
.cluster ul{margin:0;padding-left:18px;font-size:12px;word-break:break-all}
.url{word-break:break-all;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.note{color:#495057;font-size:13px}
.warn{background:#fff3bf;border:1px solid #fab005;padding:8px 12px;border-radius:4px;margin:12px 0}
pre{background:#f1f3f5;padding:10px;border-radius:4px;overflow:auto;font-size:12px}
img.plot{max-width:100%}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _int(n: int) -> str:
    return f"{n:,}"


def _pct(part: float, whole: float) -> str:
    return f"{percent(part, whole):.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def _clip_text(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _score(value: Any) -> str:
    return "\u2014" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _when(iso: Any) -> str:
    try:
        return datetime.datetime.fromisoformat(str(iso)).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return str(iso)


def _card(ident: str, value: Any, label: str, shown: str) -> str:
    return (f'<div class="card" id="{ident}" data-value="{esc(value)}">'
            f'<div class="v">{esc(shown)}</div><div class="l">{esc(label)}</div></div>')


def _funnel_html(steps: Sequence[Mapping[str, Any]], rows_in: int) -> str:
    out = ['<table id="funnel-table"><tr><th>stage</th><th>status</th><th class="n">removed</th>'
           '<th class="n">% of rows in</th><th class="n">remaining</th><th class="n">% remaining</th>'
           '<th>remaining</th></tr>',
           f'<tr class="total" data-funnel="rows_in" data-remaining="{rows_in}"><td>rows in</td><td></td>'
           f'<td class="n"></td><td class="n"></td><td class="n">{_int(rows_in)}</td>'
           f'<td class="n">100.0%</td><td><div class="bar"><span style="width:100%"></span></div></td></tr>']
    for step in steps:
        removed, remaining = step["removed"], step["remaining"]
        width = percent(remaining, rows_in)
        out.append(
            f'<tr class="{"zero" if not removed else ""}" data-funnel="step" data-status="{esc(step["status"])}"'
            f' data-removed="{removed}" data-remaining="{remaining}">'
            f'<td>{esc(step["stage"])}</td><td>{esc(step["status"])}</td>'
            f'<td class="n">{_int(removed)}</td><td class="n">{_pct(removed, rows_in)}</td>'
            f'<td class="n">{_int(remaining)}</td><td class="n">{_pct(remaining, rows_in)}</td>'
            f'<td><div class="bar"><span style="width:{width:.2f}%"></span></div></td></tr>')
    kept = steps[-1]["remaining"] if steps else rows_in
    out.append(f'<tr class="total" data-funnel="kept" data-remaining="{kept}"><td>kept</td><td>ok</td>'
               f'<td class="n"></td><td class="n"></td><td class="n">{_int(kept)}</td>'
               f'<td class="n">{_pct(kept, rows_in)}</td><td></td></tr></table>')
    return "".join(out)


def _errors_html(errors: Mapping[Tuple[str, str], int], by_status: Mapping[str, int]) -> str:
    if not errors:
        return '<p class="note">No row carries an error.</p>'
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    items = sorted(errors.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), -kv[1], kv[0][1]))
    out = ['<table id="error-table"><tr><th>status</th><th>error class</th><th class="n">rows</th>'
           '<th class="n">% of status</th><th></th></tr>']
    for (status, cls), n in items:
        whole = by_status.get(status, 0)
        red = " red" if status == "fetch_failed" else ""
        out.append(f'<tr data-error-status="{esc(status)}" data-error-class="{esc(cls)}" data-count="{n}">'
                   f'<td>{esc(status)}</td><td>{esc(cls) or "<i>(empty)</i>"}</td><td class="n">{_int(n)}</td>'
                   f'<td class="n">{_pct(n, whole)}</td><td><div class="bar{red}">'
                   f'<span style="width:{percent(n, whole):.2f}%"></span></div></td></tr>')
    out.append("</table>")
    return "".join(out)


def _tile(sample: Mapping[str, Any], role: str) -> str:
    uri = thumbnail(sample.get("image"))
    image = (f'<img src="{uri}" alt="{esc(sample["key"])}">' if uri
             else '<div class="noimg">image not decodable</div>')
    return (f'<div class="tile" data-tile="{role}" data-key="{esc(sample["key"])}">{image}'
            f'<div>{esc(_clip_text(sample.get("caption"), 160))}</div>'
            f'<div class="score">score {_score(sample.get("clip_score"))}</div></div>')


def _dropped_html(rows: Sequence[Mapping[str, Any]], ident: str) -> str:
    out = [f'<table id="{ident}"><tr><th class="n">score</th><th>caption</th><th>url</th></tr>']
    for row in rows:
        out.append(f'<tr data-uid="{esc(row["uid"])}"><td class="n">{_score(row["clip_score"])}</td>'
                   f'<td>{esc(_clip_text(row["caption"], 160))}</td>'
                   f'<td class="url">{esc(_clip_text(row["url"], 120))}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _clusters_html(reps: Sequence[str], details: LedgerDetails, sizes: Mapping[str, int],
                   samples: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for rep in reps:
        row = details.representatives.get(rep)
        sample = samples.get(rep)
        if sample is not None:
            image = _tile(sample, "cluster")
        elif row is None:
            image = '<div class="tile"><div class="noimg">kept by an earlier run</div></div>'
        else:
            image = (f'<div class="tile"><div class="noimg">representative is {esc(row["status"])}</div>'
                     f'<div>{esc(_clip_text(row["caption"], 160))}</div></div>')
        members = details.members.get(rep, [])
        items = "".join(f'<li><b>{esc(m["status"])}</b> <span class="note">{esc(m["error"])}</span><br>'
                        f'<span class="url">{esc(_clip_text(m["url"], 140))}</span></li>' for m in members)
        more = sizes[rep] - len(members)
        if more > 0:
            items += f"<li class=note>\u2026 and {_int(more)} more</li>"
        rep_url = esc(_clip_text(row["url"], 140)) if row else esc(rep)
        out.append(f'<div class="cluster" data-representative="{esc(rep)}" data-duplicates="{sizes[rep]}">'
                   f'{image}<div><div class="note">representative: <span class="url">{rep_url}</span></div>'
                   f'<div class="note">{_int(sizes[rep])} duplicate(s):</div><ul>{items}</ul></div></div>')
    return "".join(out)


def _config_html(config: Mapping[str, Any]) -> str:
    out = []
    for section, values in config.items():
        rows = "".join(f"<tr><td>{esc(section)}.{esc(k)}</td><td class=url>{esc(json.dumps(v, default=str))}</td></tr>"
                       for k, v in (values or {}).items()) if isinstance(values, Mapping) else \
            f"<tr><td>{esc(section)}</td><td>{esc(values)}</td></tr>"
        out.append(rows)
    return '<table id="config-table"><tr><th>key</th><th>value</th></tr>' + "".join(out) + "</table>"


def render_html(root: str, stats: Mapping[str, Any], summary: LedgerSummary, details: LedgerDetails,
                kept_samples: Sequence[Mapping[str, Any]], cluster_reps: Sequence[str],
                cluster_samples: Mapping[str, Mapping[str, Any]]) -> str:
    """The page, from figures already computed (no I/O except drawing plots)."""
    by_status = {k: int(v) for k, v in stats.get("by_status", {}).items()}
    steps = stats.get("funnel") or funnel(by_status)
    rows_in = int(stats.get("ledger_rows", sum(by_status.values())))
    kept = int(by_status.get("ok", 0))
    config = stats.get("config", {})
    clip_config = config.get("clip", {}) if isinstance(config, Mapping) else {}
    has_mpl = _matplotlib() is not None
    parts: List[str] = []
    warnings = []
    ledger_counts = {k: v for k, v in summary.by_status.items() if v}
    if ledger_counts != {k: v for k, v in by_status.items() if v}:
        warnings.append("stats.json and the ledger disagree on the counts per status "
                        f"(ledger: {json.dumps(dict(sorted(ledger_counts.items())))}); "
                        "the funnel shows stats.json.")
    if stats.get("rows_in") is not None and int(stats["rows_in"]) != rows_in:
        warnings.append(f"{stats['rows_in']} input rows were read but the ledger holds {rows_in}.")
    if not has_mpl:
        warnings.append("matplotlib is not installed: plots are left out "
                        "(pip install 'paircurate[report]').")

    parts.append('<nav><a href="#funnel">Funnel</a><a href="#errors">Errors</a>'
                 + ('<a href="#clip">CLIP scores</a>' if summary.scored else "")
                 + ('<a href="#duplicates">Duplicates</a>' if summary.duplicates_of else "")
                 + '<a href="#samples">Kept samples</a><a href="#throughput">Throughput</a>'
                   '<a href="#config">Config</a></nav>')
    parts += [f'<div class="warn">{esc(w)}</div>' for w in warnings]

    parts.append(f'<section id="funnel"><h2>Funnel</h2><p class="note">Every input row ends in exactly '
                 f'one status; each stage removes rows, the rest go on.</p>{_funnel_html(steps, rows_in)}</section>')

    fetch_total = sum(n for (s, _), n in summary.errors.items() if s == "fetch_failed")
    parts.append(f'<section id="errors"><h2>Errors by class</h2><p class="note">Class = the error text before '
                 f'the first colon. Failed fetches: <b id="fetch-failed-rows" data-value="{fetch_total}">'
                 f'{_int(fetch_total)}</b>.</p>{_errors_html(summary.errors, summary.by_status)}</section>')

    if summary.scored:
        threshold, label = clip_threshold(clip_config, summary.lowest_kept_score)
        plot = score_histogram_png(details.edges, details.hist, threshold, label) if has_mpl else None
        n_filtered = by_status.get("clip_filtered", 0)
        section = ['<section id="clip"><h2>CLIP scores</h2>',
                   f'<p class="note">{_int(summary.scored)} pairs scored '
                   f'(<span id="clip-scored" data-value="{summary.scored}"></span>'
                   f'min {_score(summary.score_min)}, max {_score(summary.score_max)}); threshold: '
                   f'<b id="clip-threshold" data-value="{esc("" if threshold is None else repr(threshold))}">{esc(label)}'
                   f'</b>; <span id="clip-filtered" data-value="{n_filtered}">{_int(n_filtered)}</span> '
                   f'pairs dropped.</p>']
        if plot:
            section.append(f'<img class="plot" id="clip-histogram" src="{plot}" alt="CLIP score histogram">')
        hist_rows = "".join(
            f'<tr data-bin="{i}"><td class="n">{lo:.4f}</td><td class="n">{hi:.4f}</td>'
            + "".join(f'<td class="n">{details.hist[k][i]}</td>' for k in ("kept", "clip_filtered", "other"))
            + "</tr>"
            for i, (lo, hi) in enumerate(zip(details.edges[:-1], details.edges[1:]))
            if any(details.hist[k][i] for k in details.hist))
        section.append('<details><summary class="note">histogram as a table</summary><table id="clip-hist-table">'
                       '<tr><th class="n">from</th><th class="n">to</th><th class="n">kept</th>'
                       f'<th class="n">clip_filtered</th><th class="n">other</th></tr>{hist_rows}</table></details>')
        if details.dropped_top:
            section.append('<h3>Dropped by CLIP, just under the threshold</h3>'
                           '<p class="note">Their images are not kept anywhere (only kept pairs reach the shards).</p>'
                           + _dropped_html(details.dropped_top, "clip-dropped-top"))
            bottom_uids = {r["uid"] for r in details.dropped_top}
            bottom = [r for r in details.dropped_bottom if r["uid"] not in bottom_uids]
            if bottom:
                section.append('<h3>Dropped by CLIP, lowest scores</h3>'
                               + _dropped_html(bottom, "clip-dropped-bottom"))
        section.append("</section>")
        parts.append("".join(section))

    if summary.duplicates_of:
        sizes = cluster_size_counts(summary.duplicates_of)
        n_dups = sum(summary.duplicates_of.values())
        plot = cluster_sizes_png(sizes) if has_mpl else None
        size_rows = "".join(f'<tr data-cluster-size="{s}" data-clusters="{c}"><td class="n">{s}</td>'
                            f'<td class="n">{_int(c)}</td></tr>' for s, c in sizes.items())
        parts.append(
            f'<section id="duplicates"><h2>Image duplicates</h2><p class="note">'
            f'<span id="dup-rows" data-value="{n_dups}">{_int(n_dups)}</span> exact or near duplicates in '
            f'<span id="dup-clusters" data-value="{len(summary.duplicates_of)}">{_int(len(summary.duplicates_of))}'
            f'</span> clusters, grouped by their representative (duplicate_of).</p>'
            + (f'<img class="plot" id="cluster-sizes" src="{plot}" alt="cluster sizes">' if plot else "")
            + '<table id="cluster-size-table" style="width:auto"><tr><th class="n">cluster size</th>'
              f'<th class="n">clusters</th></tr>{size_rows}</table>'
            + _signals_html(summary.duplicate_signals)
            + _rejected_html(stats)
            + f'<h3>Largest clusters</h3><div class="clusters">'
              f'{_clusters_html(cluster_reps, details, summary.duplicates_of, cluster_samples)}</div>'
            + "</section>")

    tiles = "".join(_tile(s, "kept") for s in kept_samples)
    parts.append(f'<section id="samples"><h2>Kept samples</h2><p class="note">'
                 f'{len(kept_samples)} kept pairs read from the start of the shards (thumbnails of the '
                 f'stored images; score = CLIP score).</p>'
                 f'<div class="grid" id="kept-grid">{tiles or "<p class=note>No kept samples.</p>"}</div></section>')

    duration = float(stats.get("duration_s") or 0)
    shard_bytes = int(stats.get("shard_bytes") or 0)
    parts.append(
        '<section id="throughput"><h2>Throughput</h2><table style="width:auto">'
        f'<tr><td>wall time</td><td class="n" id="duration" data-value="{duration}">{duration:,.1f} s</td></tr>'
        f'<tr><td>ledger rows / s</td><td class="n" id="rows-per-s" data-value="{stats.get("rows_per_s")}">'
        f'{float(stats.get("rows_per_s") or 0):,.1f}</td></tr>'
        f'<tr><td>kept samples / s</td><td class="n">{kept / duration if duration else 0:,.1f}</td></tr>'
        f'<tr><td>shard bytes / s</td><td class="n">{_bytes(shard_bytes / duration if duration else 0)}/s</td></tr>'
        '</table><p class="note">Overall figures for the whole run (start to finalisation).</p>'
        + _timeline_table(stats) + _stage_table(stats.get("stages") or {}) + _shuffle_table(stats) + '</section>')

    versions = stats.get("versions", {})
    version_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in versions.items())
    model = stats.get("clip_model")
    parts.append('<section id="config"><h2>Configuration and versions</h2>'
                 + (f'<p class="note">CLIP model: {esc(json.dumps(model))}</p>' if model else "")
                 + f'<h3>Versions</h3><table id="versions-table" style="width:auto">{version_rows}</table>'
                 + f'<h3>Config</h3>{_config_html(config if isinstance(config, Mapping) else {})}</section>')

    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f'<header><h1>paircurate run report</h1><div class="meta">{esc(root)} \u00b7 started '
              f'{esc(_when(stats.get("started")))} \u00b7 report generated {generated}</div><div class="cards">'
              + _card("rows-in", rows_in, "rows in", _int(rows_in))
              + _card("kept", kept, f"kept ({_pct(kept, rows_in)})", _int(kept))
              + _card("shards", stats.get("shards", 0), f"shards ({_bytes(shard_bytes)})", _int(int(stats.get("shards", 0))))
              + _card("scored", summary.scored, "CLIP-scored", _int(summary.scored))
              + _card("throughput", stats.get("rows_per_s"), "rows / s", f'{float(stats.get("rows_per_s") or 0):,.1f}')
              + _card("duration-card", duration, "duration", f"{duration:,.1f} s")
              + "</div></header>")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>paircurate report \u2014 {esc(root)}</title><style>{CSS}</style></head><body>'
            + header + "<main>" + "".join(parts) + "</main></body></html>\n")


# --------------------------------------------------------------------------- entry points

def build_report(root: str) -> str:
    """The report page of the output folder ``root`` as a string."""
    root = root.rstrip("/") if root not in ("/",) else root
    stats = read_stats(root)
    ledger_files(root)  # a clear error before anything else
    columns = ["status", "error", "clip_score", "duplicate_of"]
    summary = summarise_ledger(iter_ledger(root, columns))
    reps = largest_clusters(summary.duplicates_of)
    needs_second_pass = summary.scored or reps
    details = LedgerDetails()
    if needs_second_pass:
        columns = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of", "clip_score"]
        details = collect_details(iter_ledger(root, columns), summary, reps)
    wanted = {rep: row["shard"] for rep, row in details.representatives.items()
              if row.get("status") == "ok" and row.get("shard")}
    kept_samples, cluster_samples = read_samples(root, KEPT_SAMPLES, wanted)
    return render_html(root, stats, summary, details, kept_samples, reps, cluster_samples)


def write_report(root: str) -> str:
    """Build OUT/report.html (complete, then renamed into place); return its path."""
    page = build_report(root).encode("utf-8")
    path = _join(root, REPORT_NAME)
    temp = path + ".incomplete"
    handle = FileSystems.create(temp, mime_type="text/html",
                                compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        handle.write(page)
    finally:
        handle.close()
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])
    return path


# --------------------------------------------------------------------------- inspect

def parse_statuses(values: Iterable[str]) -> List[str]:
    """Repeated and comma-separated status names, checked against the vocabulary."""
    statuses = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [s for s in statuses if s not in STATUS_ORDER]
    if unknown:
        raise ReportError(f"unknown status {', '.join(unknown)}; valid statuses: " + ", ".join(STATUS_ORDER))
    return statuses


def inspect_rows(root: str, statuses: Sequence[str] = (), columns: Sequence[str] = INSPECT_COLUMNS,
                 limit: int = 20) -> Tuple[List[Dict[str, Any]], int]:
    """Up to ``limit`` ledger rows (0: all) with one of ``statuses`` (none: any), and how many match."""
    available = ledger_schema(root).names
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise ReportError(printable(f"unknown column {', '.join(unknown)}; ledger columns: "
                                    + ", ".join(available)))
    wanted = pa.array(list(statuses), pa.string())
    read = list(dict.fromkeys(list(columns) + ["status"]))
    rows: List[Dict[str, Any]] = []
    matching = 0
    for table in iter_ledger(root, read):
        if statuses:
            table = table.filter(pc.is_in(table["status"], value_set=wanted))
        matching += len(table)
        if limit == 0 or len(rows) < limit:
            take = len(table) if limit == 0 else limit - len(rows)
            rows.extend(table.slice(0, take).select(list(columns)).to_pylist())
    return rows, matching


#: Characters a terminal acts on rather than shows: C0 controls, DEL, C1 controls (ESC and
#: CSI start escape sequences), bidi marks, embeddings, overrides and isolates (they
#: reorder what follows), and the Unicode line and paragraph separators.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                                r"\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with terminal control characters shown as escapes (ESC -> \\x1b, RLO -> \\u202e)."""
    return _TERMINAL_CONTROLS.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
        text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    # Newlines and tabs would break the table; escape sequences would drive the terminal.
    return printable(" ".join(str(value).split()))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], max_width: int = 40) -> str:
    """Rows as an aligned text table; cells longer than ``max_width`` end in an ellipsis."""
    cells = [[_clip_text(_cell(row.get(c)), max_width) for c in columns] for row in rows]
    header = [printable(c) for c in columns]  # carried input columns may have any name
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [bool(rows) and all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
               and any(row.get(c) is not None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _signals_html(signals: Mapping[str, int]) -> str:
    """Which signal found the image duplicates (exact, pHash, smooth hash, flip)."""
    rows = "".join(f'<tr><td>{esc(name)}</td><td class="n" data-signal="{esc(name)}" '
                   f'data-value="{int(signals.get(name, 0))}">{_int(int(signals.get(name, 0)))}</td></tr>'
                   for name in DUPLICATE_SIGNALS)
    return ('<h3>Found by</h3><table id="dup-signals" style="width:auto"><tr><th>signal</th>'
            f'<th class="n">duplicates</th></tr>{rows}</table><p class="note">exact: the same decoded '
            'pixels; phash / smooth: a verified pair whose candidate came from the pHash or, for smooth '
            'images, the smooth hash; flip: a verified pair of mirrored images.</p>')


def _rejected_html(stats: Mapping[str, Any]) -> str:
    """The candidate pairs verification rejected that came nearest to the threshold."""
    dedup = stats.get("dedup") or {}
    nearest = dedup.get("nearest_rejected")
    if nearest is None:
        return ""
    threshold = ((stats.get("config") or {}).get("dedup") or {}).get("verify_max_distance")
    rows = "".join(
        f'<tr><td class="n" data-verify="{float(p.get("verify", 0)):.3f}">{float(p.get("verify", 0)):.3f}</td>'
        f'<td class="n">{int(p.get("distance", 0))}</td><td>{esc(str(p.get("signal")))}</td>'
        f'<td><code>{esc(str(p.get("uid_a")))}</code></td><td><code>{esc(str(p.get("uid_b")))}</code></td></tr>'
        for p in nearest[:10])
    counts = (f'{_int(int(dedup.get("verified_pairs") or 0))} candidate pairs verified, '
              f'{_int(int(dedup.get("rejected_pairs") or 0))} rejected. ')
    return (f'<h3>Nearest rejected candidates</h3><p class="note">{counts}Verification distance at or '
            f'below <code>dedup.verify_max_distance</code> ({esc(str(threshold))}) makes a near duplicate; '
            'these candidate pairs came closest without being merged (their uids are ledger rows: '
            'look at the pairs to tune the threshold).</p>'
            + ('<table id="nearest-rejected" style="width:auto"><tr><th class="n">verification</th>'
               '<th class="n">hash distance</th><th>signal</th><th>uid</th><th>uid</th></tr>'
               f'{rows}</table>' if rows else '<p class="note">No candidate pair was rejected.</p>'))


def _shuffle_table(stats: Mapping[str, Any]) -> str:
    """Shuffle volume from stats.json: total, per input row, and the largest steps."""
    total = stats.get("shuffle_bytes")
    if total is None:
        return '<p class="note">The runner reported no shuffle volume for this run.</p>'
    per_row = stats.get("shuffle_bytes_per_row")
    steps = sorted((stats.get("shuffle_bytes_by_step") or {}).items(), key=lambda kv: -kv[1])[:8]
    rows = "".join(f'<tr><td>{esc(name)}</td><td class="n">{_bytes(n)}</td></tr>' for name, n in steps)
    return ('<h3>Shuffle volume</h3><table style="width:auto" id="shuffle">'
            f'<tr><td>total</td><td class="n" id="shuffle-bytes" data-value="{int(total)}">{_bytes(int(total))}</td></tr>'
            f'<tr><td>per input row</td><td class="n" id="shuffle-per-row" data-value="{per_row}">'
            f'{float(per_row or 0):,.0f} B</td></tr>' + rows + '</table>'
            '<p class="note">Encoded bytes of the elements entering each shuffle and side input '
            '(image bytes stay in staging and never enter one); the largest steps are listed.</p>')


def _timeline_table(stats: Mapping[str, Any]) -> str:
    """Rows/s over time, from the progress timeline the launcher kept (stats.json: progress.timeline)."""
    from paircurate.progress import duration, throughput_series

    progress = stats.get("progress") if isinstance(stats.get("progress"), Mapping) else {}
    try:
        series = throughput_series(progress.get("timeline") or [])
    except (TypeError, ValueError, IndexError):
        series = []
    if not series:
        return '<p class="note">No progress timeline was recorded for this run.</p>'
    peak = max(rate for _, _, rate in series) or 1.0
    rows = "".join(
        f'<tr><td>{duration(start)} – {duration(end)}</td><td class="n" data-rate="{rate:.3f}">{rate:,.1f}</td>'
        f'<td><div style="background:#4c78a8;height:0.8em;width:{max(0.0, 100.0 * rate / peak):.1f}%;'
        f'min-width:1px"></div></td></tr>'
        for start, end, rate in series)
    return ('<h3>Over time</h3><table style="width:auto;min-width:24em" id="timeline"><tr><th>elapsed</th>'
            '<th>rows / s past fetch</th><th style="width:12em"></th></tr>' + rows + '</table>'
            '<p class="note">Rows that passed the fetch stage per second (fetched, or already decided), '
            'from the progress the workers reported while the run went. Dedup, CLIP and the writers '
            'follow the last fetch.</p>')


def _stage_table(stages: Mapping[str, Any]) -> str:
    """Per-stage work time from stats.json (records, busy seconds summed over threads, ms per record)."""
    if not stages:
        return '<p class="note">No per-stage timings were recorded for this run.</p>'
    rows = "".join(
        f'<tr><td>{esc(name)}</td><td class="n" data-stage="{esc(name)}" data-records="{entry.get("records")}">'
        f'{int(entry.get("records") or 0):,}</td><td class="n">{float(entry.get("busy_s") or 0):,.2f} s</td>'
        f'<td class="n">{float(entry.get("ms_per_record") or 0):,.2f}</td></tr>'
        for name, entry in sorted(stages.items()))
    return ('<h3>Per stage</h3><table style="width:auto" id="stages"><tr><th>stage</th><th>records</th>'
            '<th>busy time (all threads)</th><th>ms / record</th></tr>' + rows + '</table>'
            '<p class="note">Busy time adds up the work of every thread: with 64 fetch threads it can far '
            'exceed the wall time, and a fetch waiting for a per-host slot counts as busy. Shuffle-bound stages (dedup, shard numbering) are not timed.</p>')
