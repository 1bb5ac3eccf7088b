"""report.html: the figures of a run laid out by Jinja2 templates (templates/), autoescaped.

Python computes what the page shows (summaries, plots, thumbnails) and hands it
to the templates as plain values; the templates hold all the markup and CSS.
Autoescaping is on for every template, so a caption, URL or error from the
ledger is shown as text whatever it holds.  The page is one self-contained
file: thumbnails and plots are data: URIs, and a Content-Security-Policy
forbids any network load.  Figures that tests and monitoring read back carry
``data-*`` attributes.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jinja2

from paircurate.report import plots, text
from paircurate.report.output import (
    KEPT_SAMPLES,
    iter_ledger,
    join,
    ledger_files,
    ledger_schema,
    read_samples,
    read_stats,
)
from paircurate.report.summaries import (
    BEFORE_LANGUAGE,
    DUPLICATE_SIGNALS,
    TAG_PRESENT,
    LedgerDetails,
    LedgerSummary,
    clip_threshold,
    cluster_size_counts,
    collect_details,
    funnel,
    language_mix,
    largest_clusters,
    score_columns,
    summarise_ledger,
)
from paircurate.transforms.files import write_atomically
from paircurate.transforms.schema import STATUS_ORDER

REPORT_NAME = "report.html"
#: Rows of the nearest rejected duplicate candidates, and of the largest shuffle steps, shown.
NEAREST_REJECTED_SHOWN = 10
SHUFFLE_STEPS_SHOWN = 8


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The templates' environment: autoescaped, strict about undefined names, None shown as ''."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("paircurate.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        finalize=lambda value: "" if value is None else value)
    env.filters.update(thousands=text.thousands, decimals=text.decimals, human_bytes=text.human_bytes,
                       score=text.score, clip_text=text.clip_text, tojson_text=_json_text)
    env.globals.update(pct=text.pct, percent=text.percent)
    return env


def _json_text(value: Any) -> str:
    return json.dumps(value, default=str)


def fragment(template: str, **context: Any) -> str:
    """One template of the page rendered alone (a section or part of one, for tests)."""
    return environment().get_template(template).render(**context)


# --------------------------------------------------------------------------- what the page shows

def _tile(sample: Mapping[str, Any]) -> Dict[str, Any]:
    return {"key": sample["key"], "uri": plots.thumbnail(sample.get("image")),
            "caption": sample.get("caption"), "clip_score": sample.get("clip_score")}


def timeline_rows(stats: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Rows/s over time, from the progress timeline the launcher kept (stats.json: progress.timeline)."""
    from paircurate.progress import duration, throughput_series

    progress = stats.get("progress") if isinstance(stats.get("progress"), Mapping) else {}
    try:
        series = throughput_series(progress.get("timeline") or [])
    except (TypeError, ValueError, IndexError):
        series = []
    peak = max((rate for _, _, rate in series), default=0.0) or 1.0
    return [{"from": duration(start), "to": duration(end), "rate": rate,
             "width": max(0.0, 100.0 * rate / peak)} for start, end, rate in series]


def _stage_rows(stages: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [{"name": name, "records": entry.get("records"), "busy_s": entry.get("busy_s"),
             "ms_per_record": entry.get("ms_per_record")} for name, entry in sorted(stages.items())]


def _shuffle(stats: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    total = stats.get("shuffle_bytes")
    if total is None:
        return None
    steps = sorted((stats.get("shuffle_bytes_by_step") or {}).items(), key=lambda kv: -kv[1])
    return {"total": int(total), "per_row": stats.get("shuffle_bytes_per_row"),
            "steps": steps[:SHUFFLE_STEPS_SHOWN]}


def _rejected(stats: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The candidate pairs verification rejected that came nearest to the threshold."""
    dedup = stats.get("dedup") or {}
    nearest = dedup.get("nearest_rejected")
    if nearest is None:
        return None
    return {"pairs": [{"verify": float(p.get("verify", 0)), "distance": int(p.get("distance", 0)),
                       "signal": str(p.get("signal")), "uid_a": str(p.get("uid_a")),
                       "uid_b": str(p.get("uid_b"))} for p in nearest[:NEAREST_REJECTED_SHOWN]],
            "verified": int(dedup.get("verified_pairs") or 0), "rejected": int(dedup.get("rejected_pairs") or 0),
            "threshold": str(((stats.get("config") or {}).get("dedup") or {}).get("verify_max_distance"))}


def _semantic_rejected(stats: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """Semantic dedup's candidate pairs whose exact cosine fell short of min_cosine, highest first."""
    semantic = stats.get("semantic") or {}
    nearest = semantic.get("nearest_rejected")
    if nearest is None:
        return None
    semantic_config = (((stats.get("config") or {}).get("dedup") or {}).get("semantic") or {})
    return {"pairs": [{"cosine": float(p.get("cosine", 0)), "uid_a": str(p.get("uid_a")),
                       "uid_b": str(p.get("uid_b"))} for p in nearest[:NEAREST_REJECTED_SHOWN]],
            "verified": int(semantic.get("verified_pairs") or 0),
            "rejected": int(semantic.get("rejected_pairs") or 0),
            "threshold": str(semantic_config.get("min_cosine"))}


def _config_rows(config: Mapping[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for section, values in config.items():
        if isinstance(values, Mapping):
            rows += [{"key": f"{section}.{k}", "value": _json_text(v), "json": True} for k, v in values.items()]
        else:
            rows.append({"key": section, "value": values, "json": False})
    return rows


def _clip(summary: LedgerSummary, details: LedgerDetails, clip_config: Mapping[str, Any],
          by_status: Mapping[str, int], has_plots: bool) -> Optional[Dict[str, Any]]:
    if not summary.scored:
        return None
    threshold, label = clip_threshold(clip_config, summary.lowest_kept_score)
    bins = [{"index": i, "from": lo, "to": hi, "kept": details.hist["kept"][i],
             "clip_filtered": details.hist["clip_filtered"][i], "other": details.hist["other"][i]}
            for i, (lo, hi) in enumerate(zip(details.edges[:-1], details.edges[1:]))]
    top_uids = {r["uid"] for r in details.dropped_top}
    return {"threshold": threshold, "label": label, "filtered": by_status.get("clip_filtered", 0),
            "plot": plots.score_histogram_png(details.edges, details.hist, threshold, label) if has_plots else None,
            "series": [name for name in ("kept", "clip_filtered", "other") if any(details.hist[name])],
            "bins": [b for b in bins if b["kept"] or b["clip_filtered"] or b["other"]],
            "dropped_top": details.dropped_top,
            "dropped_bottom": [r for r in details.dropped_bottom if r["uid"] not in top_uids]}


def _duplicates(summary: LedgerSummary, details: LedgerDetails, reps: Sequence[str],
                samples: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Any],
                has_plots: bool) -> Optional[Dict[str, Any]]:
    if not summary.duplicates_of:
        return None
    sizes = cluster_size_counts(summary.duplicates_of)
    clusters = []
    for rep in reps:
        members = details.members.get(rep, [])
        sample = samples.get(rep)
        clusters.append({"representative": rep, "duplicates": summary.duplicates_of[rep],
                         "row": details.representatives.get(rep),
                         "tile": _tile(sample) if sample is not None else None,
                         "members": members, "more": summary.duplicates_of[rep] - len(members)})
    return {"rows": sum(summary.duplicates_of.values()), "clusters_count": len(summary.duplicates_of),
            "sizes": sizes, "plot": plots.cluster_sizes_png(sizes) if has_plots else None,
            "signals": [(name, int(summary.duplicate_signals.get(name, 0))) for name in DUPLICATE_SIGNALS],
            "rejected": _rejected(stats), "semantic_rejected": _semantic_rejected(stats),
            "clusters": clusters}


def _languages(summary: LedgerSummary, by_status: Mapping[str, int]) -> Optional[Dict[str, Any]]:
    if summary.languages is None:
        return None
    return {"rows": sum(summary.languages.values()), "table": language_mix(summary.languages,
                                                                          summary.language_filtered),
            "filtered": int(by_status.get("language_filtered", 0)), "before": BEFORE_LANGUAGE}


def _tags(summary: LedgerSummary, details: LedgerDetails, by_status: Mapping[str, int],
          has_plots: bool) -> Optional[Dict[str, Any]]:
    if not summary.score_columns:
        return None
    columns = [{"name": name, "tag": name.startswith("tag_"), "rows": entry.rows, "low": entry.low,
                "high": entry.high, "above": entry.above,
                "hist": details.score_hist.get(name)} for name, entry in summary.score_columns.items()]
    histograms = {c["name"]: c["hist"] for c in columns if c["hist"]}
    return {"columns": columns, "present": TAG_PRESENT, "filtered": int(by_status.get("tag_filtered", 0)),
            "plot": plots.score_columns_png(histograms, TAG_PRESENT) if has_plots and histograms else None}


def page_context(root: str, stats: Mapping[str, Any], summary: LedgerSummary, details: LedgerDetails,
                 kept_samples: Sequence[Mapping[str, Any]], cluster_reps: Sequence[str],
                 cluster_samples: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Everything the templates show, as plain values (no markup)."""
    by_status = {k: int(v) for k, v in stats.get("by_status", {}).items()}
    steps = stats.get("funnel") or funnel(by_status)
    rows_in = int(stats.get("ledger_rows", sum(by_status.values())))
    kept = int(by_status.get("ok", 0))
    config = stats.get("config", {})
    config = config if isinstance(config, Mapping) else {}
    clip_config = config.get("clip", {}) or {}
    has_plots = plots.available()
    warnings = []
    ledger_counts = {k: v for k, v in summary.by_status.items() if v}
    if ledger_counts != {k: v for k, v in by_status.items() if v}:
        warnings.append("stats.json and the ledger disagree on the counts per status "
                        f"(ledger: {json.dumps(dict(sorted(ledger_counts.items())))}); "
                        "the funnel shows stats.json.")
    if stats.get("rows_in") is not None and int(stats["rows_in"]) != rows_in:
        warnings.append(f"{stats['rows_in']} input rows were read but the ledger holds {rows_in}.")
    if not has_plots:
        warnings.append("matplotlib is not installed: plots are left out "
                        "(pip install 'paircurate[report]').")
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    errors = [{"status": status, "cls": cls, "rows": n, "whole": summary.by_status.get(status, 0)}
              for (status, cls), n in sorted(summary.errors.items(),
                                             key=lambda kv: (rank.get(kv[0][0], len(rank)), -kv[1], kv[0][1]))]
    duration = float(stats.get("duration_s") or 0)
    shard_bytes = int(stats.get("shard_bytes") or 0)
    return {
        "root": root, "started": text.when(stats.get("started")),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "warnings": warnings, "rows_in": rows_in, "kept": kept, "scored": summary.scored,
        "score_min": summary.score_min, "score_max": summary.score_max,
        "shards": stats.get("shards", 0), "shard_bytes": shard_bytes, "duration": duration,
        "rows_per_s": stats.get("rows_per_s"),
        "steps": steps, "kept_after_funnel": steps[-1]["remaining"] if steps else rows_in,
        "errors": errors,
        "fetch_failed_rows": sum(n for (s, _), n in summary.errors.items() if s == "fetch_failed"),
        "clip": _clip(summary, details, clip_config, by_status, has_plots),
        "duplicates": _duplicates(summary, details, cluster_reps, cluster_samples, stats, has_plots),
        "languages": _languages(summary, by_status),
        "tags": _tags(summary, details, by_status, has_plots),
        "kept_tiles": [_tile(s) for s in kept_samples],
        "timeline": timeline_rows(stats), "stages": _stage_rows(stats.get("stages") or {}),
        "shuffle": _shuffle(stats),
        "versions": stats.get("versions", {}), "clip_model": stats.get("clip_model"),
        "config_rows": _config_rows(config),
    }


def render_html(root: str, stats: Mapping[str, Any], summary: LedgerSummary, details: LedgerDetails,
                kept_samples: Sequence[Mapping[str, Any]], cluster_reps: Sequence[str],
                cluster_samples: Mapping[str, Mapping[str, Any]]) -> str:
    """The page, from figures already computed (no I/O except drawing plots)."""
    context = page_context(root, stats, summary, details, kept_samples, cluster_reps, cluster_samples)
    return fragment("report.html.j2", **context)


# --------------------------------------------------------------------------- entry points

def build_report(root: str) -> str:
    """The report page of the output folder ``root`` as a string."""
    root = root.rstrip("/") if root not in ("/",) else root
    stats = read_stats(root)
    ledger_files(root)  # a clear error before anything else
    schema = ledger_schema(root)
    optional = [c for c in ("caption_language",) if c in schema.names] + score_columns(schema)
    columns = ["status", "error", "clip_score", "duplicate_of"] + optional
    summary = summarise_ledger(iter_ledger(root, columns))
    reps = largest_clusters(summary.duplicates_of)
    details = LedgerDetails()
    if summary.scored or reps or summary.score_columns:
        columns = ["uid", "url", "caption", "status", "error", "shard", "duplicate_of", "clip_score"]
        columns += score_columns(schema)
        details = collect_details(iter_ledger(root, columns), summary, reps)
    wanted = {rep: row["shard"] for rep, row in details.representatives.items()
              if row.get("status") == "ok" and row.get("shard")}
    kept_samples, cluster_samples = read_samples(root, KEPT_SAMPLES, wanted)
    return render_html(root, stats, summary, details, kept_samples, reps, cluster_samples)


def write_report(root: str) -> str:
    """Build OUT/report.html (complete, then renamed into place); return its path."""
    page = build_report(root).encode("utf-8")
    path = join(root, REPORT_NAME)
    write_atomically(path, page, mime_type="text/html")
    return path
