"""Figures of a run from its ledger (pyarrow), in at most two streaming passes.

Pass one (summarise_ledger) counts: statuses, error classes, score ranges,
duplicate clusters, languages, tag and head columns.  Pass two (collect_details)
needs pass one's ranges: histograms, the CLIP-dropped rows nearest the threshold
and at the bottom, the rows of the largest duplicate clusters.  Memory grows with
the number of distinct statuses, error classes, languages and duplicate clusters,
never with the number of rows.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from paircurate.transforms.schema import STATUS_LABELS, STATUS_ORDER, funnel  # noqa: F401 - funnel: re-exported

#: Each status's row label in the funnel: the status registry's (transforms/schema.py).
STAGE_OF_STATUS: Dict[str, str] = dict(STATUS_LABELS)
#: Statuses whose duplicate_of points at a kept image (a duplicate cluster's representative).
DUPLICATE_STATUSES = ("duplicate_exact", "duplicate_near", "duplicate_semantic")
#: The signals a duplicate can be found by, in the order the report lists them.
DUPLICATE_SIGNALS = ("exact", "phash", "smooth", "flip", "semantic")
#: Statuses given before caption languages are detected: their rows have no language.
BEFORE_LANGUAGE = ("invalid_input", "caption_filtered")
#: Float columns with one score per CLIP-scored pair: tag_NAME probabilities, head_NAME scores.
SCORE_COLUMN = re.compile(r"^(tag|head)_\w+$")
#: A tag counts as present above this probability.
TAG_PRESENT = 0.5
#: Languages the language table lists by name; the rest are summed as "other".
TOP_LANGUAGES = 15
CLIP_DROPPED_SAMPLES = 12  # this many just under the threshold, and as many at the bottom
CLUSTER_SAMPLES = 6
CLUSTER_MEMBERS = 8
HISTOGRAM_BINS = 40
SCORE_COLUMN_BINS = 20


# --------------------------------------------------------------------------- pure figures


def error_classes(errors: pa.Array) -> pa.Array:
    """error_class() over an Arrow column: the text before the first ':', trimmed."""
    head = pc.replace_substring_regex(errors, pattern=r"(?s):.*$", replacement="")
    return pc.utf8_trim_whitespace(head)


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


def duplicate_signal(status: str, error: Optional[str]) -> str:
    """Which signal found a duplicate: exact, phash, smooth, flip or semantic (its ledger error says).

    ``near: exact copy of UID`` is an exact copy of a near duplicate: exact.
    ``semantic: cosine 0.973 to UID`` is a semantic (CLIP embedding) duplicate.
    Ledgers from before verification (``near: distance=N``) count as phash.
    """
    text = error or ""
    if status == "duplicate_exact" or text.startswith("near: exact copy of"):
        return "exact"
    if status == "duplicate_semantic":
        return "semantic"
    word = text[len("near: "):].split(" ", 1)[0] if text.startswith("near: ") else ""
    return word if word in DUPLICATE_SIGNALS else "phash"


def largest_clusters(duplicates_of: Mapping[str, int], n: int = CLUSTER_SAMPLES) -> List[str]:
    """Representatives of the ``n`` largest clusters (ties: smallest uid)."""
    return [rep for rep, _ in heapq.nsmallest(n, duplicates_of.items(), key=lambda kv: (-kv[1], kv[0]))]


def score_columns(schema: pa.Schema) -> List[str]:
    """The ledger's tag_NAME and head_NAME columns (floating point), in schema order."""
    return [f.name for f in schema if SCORE_COLUMN.match(f.name) and pa.types.is_floating(f.type)]


def language_mix(languages: Mapping[Optional[str], int], filtered: Mapping[Optional[str], int],
                 top: int = TOP_LANGUAGES) -> List[Dict[str, Any]]:
    """The language table: the ``top`` languages by rows, the rest as one 'other' row, then none.

    ``languages`` counts rows per caption_language (None: none detected); ``filtered``
    the language_filtered rows among them.  Each row: language (a code, "other" or
    None), rows, filtered, share (of all rows counted), languages (how many codes).
    """
    total = sum(languages.values())
    named = sorted(((k, n) for k, n in languages.items() if k is not None), key=lambda kv: (-kv[1], kv[0]))
    out = [{"language": k, "rows": n, "filtered": int(filtered.get(k, 0)), "languages": 1}
           for k, n in named[:top]]
    rest = named[top:]
    if rest:
        out.append({"language": "other", "rows": sum(n for _, n in rest),
                    "filtered": sum(int(filtered.get(k, 0)) for k, _ in rest), "languages": len(rest)})
    if languages.get(None):
        out.append({"language": None, "rows": languages[None], "filtered": int(filtered.get(None, 0)),
                    "languages": 0})
    for row in out:
        row["share"] = row["rows"] / total if total else 0.0
    return out


def histogram_edges(low: float, high: float, bins: int = HISTOGRAM_BINS) -> List[float]:
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    step = (high - low) / bins
    return [low + i * step for i in range(bins)] + [high]


def _bin_counts(values: pa.Array, edges: Sequence[float]) -> List[int]:
    import numpy as np

    counts, _ = np.histogram(values.to_numpy(zero_copy_only=False), bins=np.asarray(edges))
    return counts.tolist()


def _finite(values: Any) -> pa.Array:
    """The non-null, finite values of a float column (NaN and infinities are no score)."""
    values = pc.drop_null(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.filter(pc.is_finite(values)) if len(values) else values


# --------------------------------------------------------------------------- pass one

@dataclasses.dataclass
class ScoreRange:
    """One tag_/head_ column: rows with a score, their range, rows above TAG_PRESENT (tags)."""
    rows: int = 0
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[int] = None


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
    #: duplicate representative uid -> number of duplicates pointing at it
    duplicates_of: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: signal that found each duplicate (duplicate_signal) -> rows
    duplicate_signals: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: caption_language (None: none detected) -> rows past the caption prefilter;
    #: None when the ledger has no caption_language column
    languages: Optional[Dict[Optional[str], int]] = None
    #: caption_language -> language_filtered rows
    language_filtered: Dict[Optional[str], int] = dataclasses.field(default_factory=dict)
    #: tag_/head_ column -> its range
    score_columns: Dict[str, ScoreRange] = dataclasses.field(default_factory=dict)


def _merge_min(a: Optional[float], b: Any) -> Optional[float]:
    return b if a is None else (a if b is None else min(a, b))


def _merge_max(a: Optional[float], b: Any) -> Optional[float]:
    return b if a is None else (a if b is None else max(a, b))


def _count_by(table: pa.Table, keys: List[str]) -> List[Dict[str, Any]]:
    return table.group_by(keys).aggregate([([], "count_all")]).to_pylist()


def _summarise_languages(table: pa.Table, summary: LedgerSummary) -> None:
    seen = table.filter(pc.invert(pc.is_in(table["status"], value_set=pa.array(BEFORE_LANGUAGE))))
    languages = pa.table({"lang": seen["caption_language"].cast(pa.string()),
                          "filtered": pc.equal(seen["status"], "language_filtered")})
    for row in _count_by(languages, ["lang", "filtered"]):
        summary.languages[row["lang"]] = summary.languages.get(row["lang"], 0) + row["count_all"]
        if row["filtered"]:
            summary.language_filtered[row["lang"]] = (summary.language_filtered.get(row["lang"], 0)
                                                      + row["count_all"])


def _summarise_score_column(name: str, values: pa.Array, summary: LedgerSummary) -> None:
    entry = summary.score_columns.setdefault(name, ScoreRange(above=0 if name.startswith("tag_") else None))
    values = _finite(values)
    if not len(values):
        return
    entry.rows += len(values)
    bounds = pc.min_max(values).as_py()
    entry.low = _merge_min(entry.low, bounds["min"])
    entry.high = _merge_max(entry.high, bounds["max"])
    if entry.above is not None:
        entry.above += int(pc.sum(pc.greater(values, TAG_PRESENT)).as_py() or 0)


def summarise_ledger(tables: Iterable[pa.Table]) -> LedgerSummary:
    """Counts per status and error class, score ranges, duplicate clusters, languages (one pass).

    The language figures and tag_/head_ ranges are kept when the tables hold those columns."""
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
        is_dup = pc.is_in(status, value_set=pa.array(DUPLICATE_STATUSES))
        dups = table.filter(is_dup).select(["status", "error"])
        if len(dups):
            for row in dups.group_by(["status", "error"]).aggregate([("status", "count")]).to_pylist():
                signals[duplicate_signal(row["status"], row["error"])] += row["status_count"]
        reps = pc.drop_null(pc.filter(table["duplicate_of"], is_dup))
        if len(reps):
            for row in pa.table({"rep": reps}).group_by("rep").aggregate([("rep", "count")]).to_pylist():
                duplicates[row["rep"]] += row["rep_count"]
        if "caption_language" in table.column_names:
            if summary.languages is None:
                summary.languages = {}
            _summarise_languages(table, summary)
        for name in table.column_names:
            if SCORE_COLUMN.match(name) and pa.types.is_floating(table.schema.field(name).type):
                _summarise_score_column(name, table[name], summary)
    summary.by_status = dict(by_status)
    summary.errors = dict(errors)
    summary.duplicates_of = dict(duplicates)
    summary.duplicate_signals = dict(signals)
    return summary


# --------------------------------------------------------------------------- pass two

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
    #: tag_/head_ column -> {"edges": [...], "counts": [...]}
    score_hist: Dict[str, Dict[str, List[float]]] = dataclasses.field(default_factory=dict)


def _keep_extreme(current: List[Dict[str, Any]], rows: List[Dict[str, Any]], n: int,
                  highest: bool) -> List[Dict[str, Any]]:
    key = (lambda r: (-r["clip_score"], r["uid"])) if highest else (lambda r: (r["clip_score"], r["uid"]))
    return sorted(current + rows, key=key)[:n]


def score_column_edges(name: str, entry: ScoreRange) -> List[float]:
    """Tags are probabilities: fixed bins over 0..1; heads: bins over the range seen."""
    if name.startswith("tag_"):
        return histogram_edges(0.0, 1.0, SCORE_COLUMN_BINS)
    return histogram_edges(entry.low, entry.high, SCORE_COLUMN_BINS)


def collect_details(tables: Iterable[pa.Table], summary: LedgerSummary,
                    representatives: Sequence[str], dropped: int = CLIP_DROPPED_SAMPLES,
                    members: int = CLUSTER_MEMBERS) -> LedgerDetails:
    """Second pass: histograms, sample of CLIP-dropped rows, the chosen clusters' rows."""
    details = LedgerDetails()
    if summary.scored:
        details.edges = histogram_edges(summary.score_min, summary.score_max)
        details.hist = {k: [0] * HISTOGRAM_BINS for k in ("kept", "clip_filtered", "other")}
    for name, entry in summary.score_columns.items():
        if entry.rows:
            details.score_hist[name] = {"edges": score_column_edges(name, entry),
                                        "counts": [0] * SCORE_COLUMN_BINS}
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
                details.dropped_bottom = _keep_extreme(details.dropped_bottom, bottom.select(cols).to_pylist(),
                                                       dropped, False)
        for name, hist in details.score_hist.items():
            values = _finite(table[name])
            if len(values):
                hist["counts"] = [a + b for a, b in zip(hist["counts"], _bin_counts(values, hist["edges"]))]
        if len(reps):
            cols = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of"]
            for row in table.filter(pc.is_in(table["uid"], value_set=reps)).select(cols).to_pylist():
                details.representatives[row["uid"]] = row
            is_dup = pc.is_in(status, value_set=pa.array(DUPLICATE_STATUSES))
            of_rep = pc.and_(is_dup, pc.fill_null(pc.is_in(table["duplicate_of"], value_set=reps), False))
            for row in table.filter(of_rep).select(cols).to_pylist():
                bucket = details.members.setdefault(row["duplicate_of"], [])
                if len(bucket) < members:
                    bucket.append(row)
    return details
