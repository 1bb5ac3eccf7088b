"""Text helpers shared by the page (as Jinja2 filters) and the terminal table of `inspect`."""
from __future__ import annotations

import datetime
import math
import re
from typing import Any

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


def clip_text(text: Any, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the last an ellipsis when anything was cut."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def thousands(n: Any) -> str:
    """1234567 -> '1,234,567'; None reads as 0."""
    return f"{int(n or 0):,}"


def decimals(value: Any, digits: int = 1) -> str:
    """A number with thousands separators and ``digits`` decimals; None reads as 0."""
    return f"{float(value or 0):,.{digits}f}"


def pct(part: float, whole: float) -> str:
    return f"{percent(part, whole):.1f}%"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def score(value: Any, digits: int = 4) -> str:
    """A score to ``digits`` decimals; a missing one (None, NaN) is an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    return f"{value:.{digits}f}"


def when(iso: Any) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM:SS TZ'; anything else as given."""
    try:
        return datetime.datetime.fromisoformat(str(iso)).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return str(iso)
