"""`paircurate inspect`: ledger rows by status, as an aligned text table safe for a terminal."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from paircurate.report.output import ReportError, iter_ledger, ledger_schema
from paircurate.report.text import clip_text, printable
from paircurate.transforms.schema import STATUS_ORDER

#: Columns `paircurate inspect` prints unless told otherwise.
INSPECT_COLUMNS = ("uid", "url", "caption", "status", "error", "clip_score")


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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    # Newlines and tabs would break the table; escape sequences would drive the terminal.
    return printable(" ".join(str(value).split()))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], max_width: int = 40) -> str:
    """Rows as an aligned text table; cells longer than ``max_width`` end in an ellipsis."""
    cells = [[clip_text(_cell(row.get(c)), max_width) for c in columns] for row in rows]
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
