"""The run report (OUT/report.html) and ledger inspection, from a finished output alone.

output     reads stats.json, the Parquet ledger and sample shard members back
summaries  the run's figures from the ledger (pyarrow, streamed in two passes)
plots      matplotlib plots and thumbnails as data: URIs
render     the page: Jinja2 templates (templates/), autoescaped
inspect    `paircurate inspect`: ledger rows as a terminal-safe text table
"""
from paircurate.report.inspect import INSPECT_COLUMNS, format_table, inspect_rows, parse_statuses
from paircurate.report.output import (
                                      KEPT_SAMPLES,
                                      ReportError,
                                      iter_ledger,
                                      ledger_files,
                                      ledger_schema,
                                      read_samples,
                                      read_stats,
)
from paircurate.report.render import REPORT_NAME, build_report, render_html, write_report
from paircurate.report.summaries import (
                                      CLIP_DROPPED_SAMPLES,
                                      DUPLICATE_SIGNALS,
                                      STAGE_OF_STATUS,
                                      LedgerDetails,
                                      LedgerSummary,
                                      clip_threshold,
                                      cluster_size_counts,
                                      collect_details,
                                      duplicate_signal,
                                      error_classes,
                                      funnel,
                                      language_mix,
                                      largest_clusters,
                                      summarise_ledger,
)
from paircurate.report.text import printable

__all__ = [
    "CLIP_DROPPED_SAMPLES", "DUPLICATE_SIGNALS", "INSPECT_COLUMNS", "KEPT_SAMPLES", "REPORT_NAME",
    "STAGE_OF_STATUS", "LedgerDetails", "LedgerSummary", "ReportError", "build_report", "clip_threshold",
    "cluster_size_counts", "collect_details", "duplicate_signal", "error_classes", "format_table",
    "funnel", "inspect_rows", "iter_ledger", "language_mix", "largest_clusters", "ledger_files",
    "ledger_schema", "parse_statuses", "printable", "read_samples", "read_stats", "render_html",
    "summarise_ledger", "write_report",
]
