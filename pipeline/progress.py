"""Progress of a run: workers tally in memory, files carry the tallies, the launcher sums them.

Every worker process keeps one in-memory tally per run (``tally(folder)``, in
paircurate.transforms.tally, the stages' side): counts such as ``read/rows``,
``fetch/ok``, ``fetch/http_404`` or ``ledger/ok``, raised by one dictionary
increment per record.  A timer thread rewrites the process's file,
``OUT/_work/progress/worker-<host>-<pid>-<token>.json``, every FLUSH_SECONDS when
something changed (complete, then renamed, through Beam's FileSystems on object
stores), and once more when the process exits.
The launcher (``Reporter``) sums the files for the live display and keeps a
timeline of the sums (``timeline.json``, with ``plan.json``: the input's size);
``paircurate status OUT`` reads the same files from another terminal.  The
files live under ``_work``, which finalisation deletes.

The functions that turn counts into figures and lines are pure (``view``,
``format_line``, ``format_status``) and tested without a pipeline.
"""
from __future__ import annotations

import datetime
import json
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO, Tuple

# Workers' tallies live in the lower layer; re-exported for the launcher and the tests.
from paircurate.transforms.tally import (  # noqa: F401
    FLUSH_SECONDS,
    PASSED,
    RESUMED,
    WORKER_PREFIX,
    Tally,
    close_tallies,
    tally,
    write_file,
)

#: Seconds between the launcher's reads of the progress files (local runs; remote runs, on object stores).
POLL_SECONDS, REMOTE_POLL_SECONDS = 2.0, 10.0
#: Seconds between two plain progress lines when the display is not a terminal.
LINE_SECONDS = 30.0
#: Seconds between two points of the timeline (rows/s over time in the report).
TIMELINE_SECONDS = 10.0
#: The window over which "now" figures (rows/s, success rate, top errors) are taken.
WINDOW_SECONDS = 60.0
#: The most points a timeline keeps; beyond it, every other point is dropped.
TIMELINE_POINTS = 720

PLAN_FILE = "plan.json"
TIMELINE_FILE = "timeline.json"

# --------------------------------------------------------------------------- files

def read_file(path: str) -> Optional[Any]:
    """A JSON file's value; None when it is missing or cannot be parsed (being replaced, damaged)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - gone between listing and reading, on any filesystem
        return None


def worker_files(folder: str) -> List[str]:
    from apache_beam.io.filesystems import FileSystems

    try:
        matches = FileSystems.match([FileSystems.join(folder, WORKER_PREFIX + "*.json")])[0].metadata_list
    except Exception:  # noqa: BLE001 - no folder yet (or any more)
        return []
    return sorted(m.path for m in matches)


def sum_counts(items: Iterable[Mapping[str, int]]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for counts in items:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + int(value)
    return total


def read_workers(folder: str) -> Tuple[Dict[str, int], int, Optional[float]]:
    """(summed counts, worker files, newest update as a Unix time) of a run's progress folder."""
    docs = [d for d in (read_file(p) for p in worker_files(folder)) if isinstance(d, dict)]
    counts = sum_counts(d.get("counts") or {} for d in docs)
    updated = max((float(d.get("updated") or 0) for d in docs), default=None)
    return counts, len(docs), updated


# --------------------------------------------------------------------------- input size

def input_size(tasks: Sequence[Any]) -> Dict[str, Optional[int]]:
    """What is known of the input before reading: rows (Parquet footers) or bytes (text files)."""
    rows = [getattr(t, "rows", -1) for t in tasks]
    sizes = [getattr(t, "size", -1) for t in tasks]
    return {"rows": sum(rows) if rows and all(r >= 0 for r in rows) else None,
            "bytes": sum(sizes) if sizes and all(s >= 0 for s in sizes) else None}


# --------------------------------------------------------------------------- figures

def stage_counts(counts: Mapping[str, int], stage: str) -> Dict[str, int]:
    prefix = stage + "/"
    return {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix) and v}


def worked(outcomes: Mapping[str, int]) -> Dict[str, int]:
    """A stage's outcomes for the records it worked on (not the ones it passed on)."""
    return {k: v for k, v in outcomes.items() if k not in (PASSED, RESUMED)}


def estimated_rows(counts: Mapping[str, int], plan: Mapping[str, Any]) -> Optional[int]:
    """Rows in the input: from Parquet footers, or from the bytes read so far (text inputs)."""
    if plan.get("rows") is not None:
        return int(plan["rows"])
    total_bytes, done_bytes, rows = plan.get("bytes"), counts.get("read/bytes", 0), counts.get("read/rows", 0)
    if total_bytes is None or not done_bytes:
        return None
    if done_bytes >= total_bytes:
        return rows
    return max(rows, int(round(rows * total_bytes / done_bytes)))


def view(counts: Mapping[str, int], plan: Mapping[str, Any],
         earlier: Optional[Tuple[float, Mapping[str, int]]] = None, now: Optional[float] = None) -> Dict[str, Any]:
    """The figures a person watches, from summed counts (and, for rates, a snapshot ``earlier``).

    ``earlier`` is (time, counts) some seconds before ``now``: rows/s, the fetch
    success rate and the top error classes are taken over that window; without
    it they are over the whole run so far.
    """
    total = estimated_rows(counts, plan)
    fetch = stage_counts(counts, "fetch")
    fetched = worked(fetch)
    through = sum(fetch.values())  # every row passes the fetch stage: fetched, passed on or resumed
    written = sum(stage_counts(counts, "ledger").values())
    figures: Dict[str, Any] = {
        "read": counts.get("read/rows", 0), "total": total, "total_known": plan.get("rows") is not None,
        "through_fetch": through, "fetched": sum(fetched.values()), "fetch_ok": fetched.get("ok", 0),
        "resumed": fetch.get(RESUMED, 0),
        "decoded": counts.get("resize/ok", 0), "written": written, "kept": counts.get("ledger/ok", 0),
        "rate": None, "eta_s": None, "window_s": None,
    }
    recent = fetched
    if earlier is not None and now is not None and now > earlier[0]:
        span = now - earlier[0]
        before = earlier[1]
        before_fetch = stage_counts(before, "fetch")
        figures["rate"] = (through - sum(before_fetch.values())) / span
        figures["window_s"] = span
        recent = {k: v - worked(before_fetch).get(k, 0) for k, v in fetched.items()}
        recent = {k: v for k, v in recent.items() if v > 0}
        if not recent:  # nothing fetched in the window: show the run so far
            recent = fetched
    attempts = sum(recent.values())
    figures["success"] = recent.get("ok", 0) / attempts if attempts else None
    errors = sorted(((k, v) for k, v in recent.items() if k != "ok"), key=lambda kv: (-kv[1], kv[0]))
    figures["top_errors"] = errors[:3]
    figures["phase"] = phase(figures)
    if figures["rate"] and total is not None and figures["phase"] in ("reading", "fetching"):
        figures["eta_s"] = max(0.0, (total - through) / figures["rate"])
    return figures


def phase(figures: Mapping[str, Any]) -> str:
    total = figures["total"]
    if total is None or figures["read"] < total and not figures["through_fetch"]:
        return "reading"
    if figures["through_fetch"] < total:
        return "fetching"
    if figures["written"] < total:
        return "dedup, scoring, writing"
    return "finishing"


def _n(value: Optional[int]) -> str:
    return "?" if value is None else f"{value:,}"


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_errors(errors: Sequence[Tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in errors) or "none"


def format_line(figures: Mapping[str, Any], short: bool = False) -> str:
    """One line: rows read, past fetch, fetched (success rate, top errors), decoded, kept, rows/s, ETA.

    ``short`` leaves out what the tqdm bar above it already shows (rows past fetch, rows/s, ETA).
    """
    total = figures["total"]
    about = "" if figures["total_known"] or total is None or figures["phase"] != "reading" else "~"
    parts = [f"read {_n(figures['read'])}/{about}{_n(total)}"]
    if not short:
        share = f" ({100.0 * figures['through_fetch'] / total:.0f}%)" if total else ""
        parts.append(f"past fetch {_n(figures['through_fetch'])}/{_n(total)}{share}")
    fetched = f"fetched {_n(figures['fetched'])}"
    if figures["success"] is not None:
        fetched += f" ok {100.0 * figures['success']:.1f}%"
        if figures["top_errors"]:
            fetched += f" ({format_errors(figures['top_errors'])})"
    if figures["resumed"]:
        fetched += f", {figures['resumed']:,} resumed"
    parts.append(fetched)
    parts.append(f"decoded {_n(figures['decoded'])}")
    parts.append(f"kept {_n(figures['kept'])} of {_n(figures['written'])} written")
    if not short and figures["rate"] is not None:
        parts.append(f"{figures['rate']:,.1f} rows/s")
    if not short and figures["eta_s"] is not None:
        parts.append(f"ETA {duration(figures['eta_s'])}")
    parts.append(figures["phase"])
    return " | ".join(parts)


# --------------------------------------------------------------------------- timeline

def timeline_point(elapsed: float, counts: Mapping[str, int]) -> List[float]:
    """[seconds since start, rows read, rows past fetch, fetched ok, ledger rows]."""
    return [round(elapsed, 1), counts.get("read/rows", 0), sum(stage_counts(counts, "fetch").values()),
            counts.get("fetch/ok", 0), sum(stage_counts(counts, "ledger").values())]


TIMELINE_COLUMNS = ("elapsed_s", "read", "past_fetch", "fetched_ok", "written")


def thin(points: List[List[float]], limit: int = TIMELINE_POINTS) -> List[List[float]]:
    """Keep a long run's timeline bounded: drop every other point (never the first or last)."""
    while len(points) > limit:
        points = points[:-1][::2] + [points[-1]]
    return points


def throughput_series(points: Sequence[Sequence[float]], column: str = "past_fetch",
                      buckets: int = 24) -> List[Tuple[float, float, float]]:
    """(start s, end s, rows/s) over at most ``buckets`` intervals of a timeline, for the report."""
    index = TIMELINE_COLUMNS.index(column)
    points = [p for p in points if len(p) > index]
    if len(points) < 2:
        return []
    step = max(1, -(-(len(points) - 1) // buckets))
    series = []
    for i in range(0, len(points) - 1, step):
        a, b = points[i], points[min(i + step, len(points) - 1)]
        if b[0] > a[0]:
            series.append((a[0], b[0], (b[index] - a[index]) / (b[0] - a[0])))
    return series


# --------------------------------------------------------------------------- the launcher's reporter

class Reporter:
    """Sums the workers' files while a run goes; draws a tqdm display, or a plain line every 30 s.

    ``display``: "bar" (a terminal: tqdm), "lines" (not a terminal), "off"
    (--quiet: nothing shown, the timeline is still kept for the report).
    ``metrics``: a callable giving counts from the runner's metrics, used when
    no worker file is there (a remote runner whose workers cannot write the output).
    """

    def __init__(self, folder: str, plan: Mapping[str, Any], display: str = "off",
                 stream: Optional[TextIO] = None, line_seconds: float = LINE_SECONDS,
                 poll_seconds: float = POLL_SECONDS, clock: Callable[[], float] = time.time):
        self.folder = folder
        self.plan = dict(plan)
        self.display = display
        self.stream = stream if stream is not None else sys.stderr
        self.line_seconds = line_seconds
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.started = clock()
        self.metrics: Optional[Callable[[], Dict[str, int]]] = None
        self.counts: Dict[str, int] = {}
        self.workers = 0
        self.history: List[Tuple[float, Dict[str, int]]] = []  # recent snapshots, for the window
        self.points: List[List[float]] = []
        self._last_line = self.started
        self._last_point: Optional[float] = None
        self._bar = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.plan.setdefault("started", self.started)
        write_file(f"{folder.rstrip('/')}/{PLAN_FILE}", self.plan, create_folder=True)

    # -- one step (tests drive it with their own clock)
    def poll(self) -> Dict[str, Any]:
        now = self.clock()
        counts, workers, _ = read_workers(self.folder)
        if not workers and self.metrics is not None:
            try:
                counts = self.metrics()
            except Exception:  # noqa: BLE001 - a runner that cannot report now may later
                counts = self.counts
        self.counts, self.workers = counts, workers
        self.history.append((now, dict(counts)))
        while len(self.history) > 2 and now - self.history[1][0] >= WINDOW_SECONDS:
            self.history.pop(0)
        earlier = self.history[0] if len(self.history) > 1 else None
        figures = view(counts, self.plan, earlier, now)
        if self._last_point is None or now - self._last_point >= TIMELINE_SECONDS:
            self._add_point(now)
        self._show(figures, now)
        return figures

    def _add_point(self, now: float) -> None:
        self._last_point = now
        self.points = thin(self.points + [timeline_point(now - self.started, self.counts)])
        try:
            write_file(f"{self.folder.rstrip('/')}/{TIMELINE_FILE}",
                       {"started": self.started, "points": self.points,
                        "recent": [[t, c] for t, c in self.history]}, create_folder=False)
        except Exception:  # noqa: BLE001 - progress must never fail a run
            pass

    def _show(self, figures: Mapping[str, Any], now: float) -> None:
        if self.display == "bar":
            self._draw(figures)
        elif self.display == "lines" and now - self._last_line >= self.line_seconds:
            self._last_line = now
            print(f"progress {duration(now - self.started)}: {format_line(figures)}", file=self.stream, flush=True)

    def _draw(self, figures: Mapping[str, Any]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=figures["total"], desc="rows past fetch", unit="row", file=self.stream,
                             dynamic_ncols=True, mininterval=0, position=0, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            self._status = tqdm(total=0, bar_format="{desc}", file=self.stream, position=1, leave=False)
        self._bar.total = figures["total"]
        self._bar.n = figures["through_fetch"]
        rate = f"{figures['rate']:,.1f} rows/s" if figures["rate"] is not None else "? rows/s"
        self._bar.set_postfix_str(f"{rate}, ETA {duration(figures['eta_s'])}", refresh=False)
        self._bar.refresh()
        self._status.set_description_str(format_line(figures, short=True), refresh=True)

    # -- the background thread
    def start(self) -> "Reporter":
        self._thread = threading.Thread(target=self._loop, name="paircurate-reporter", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - progress must never fail a run
                pass

    def stop(self) -> Dict[str, Any]:
        """Stop, take the final sums, close the display; return what stats.json keeps."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        close_tallies(self.folder)  # this process's own counts (in-process runs) reach their file
        try:
            counts, workers, _ = read_workers(self.folder)
            if workers:
                self.counts, self.workers = counts, workers
            self._add_point(self.clock())
        except Exception:  # noqa: BLE001
            pass
        if self._bar is not None:
            self._status.close()
            self._bar.close()
            self._bar = None
        return {"counts": self.counts, "worker_files": self.workers, "columns": list(TIMELINE_COLUMNS),
                "timeline": self.points}


# --------------------------------------------------------------------------- `paircurate status`

def run_state(root: str) -> Tuple[str, str]:
    """(state, sentence): "running", "interrupted", "finished", "stopped" or "none"."""
    from apache_beam.io.filesystems import FileSystems

    from paircurate.lock import LOCK_NAME, describe, is_stale
    from paircurate.run import RUN_MARKER, SUCCESS_MARKER

    join = FileSystems.join
    if FileSystems.exists(join(root, LOCK_NAME)):
        holder = read_file(join(root, LOCK_NAME))
        holder = holder if isinstance(holder, dict) else {}
        if holder and is_stale(holder):
            return "interrupted", (f"interrupted: the run that held the folder is gone ({describe(holder)}); "
                                   f"run the same command again to resume it")
        if holder.get("host") not in (None, socket.gethostname()):
            return "running", f"running on another host, which cannot be checked from here ({describe(holder)})"
        return "running", f"running ({describe(holder)})" if holder else "running (the lock cannot be read)"
    if FileSystems.exists(join(root, SUCCESS_MARKER)):
        return "finished", "finished"
    if FileSystems.exists(join(root, RUN_MARKER)):
        return "stopped", "not running: the run stopped before it finished (it failed, or was interrupted)"
    return "none", "no paircurate run here"


def status_lines(root: str, now: Optional[float] = None) -> List[str]:
    """What `paircurate status OUT` prints."""
    from apache_beam.io.filesystems import FileSystems

    now = time.time() if now is None else now
    state, sentence = run_state(root)
    lines = [f"{root}: {sentence}"]
    if state == "finished":
        stats = read_file(FileSystems.join(root, "stats.json"))
        if isinstance(stats, dict):
            lines.append(f"rows in {stats.get('rows_in', 0):,}, kept {stats.get('kept', 0):,}, "
                         f"{stats.get('shards', 0):,} shards, {float(stats.get('duration_s') or 0):,.1f} s, "
                         f"{float(stats.get('rows_per_s') or 0):,.1f} rows/s")
        return lines
    folder = FileSystems.join(FileSystems.join(root, "_work"), "progress")
    counts, workers, updated = read_workers(folder)
    if not workers:
        if state != "none":
            lines.append("no progress reported yet")
        return lines
    plan = read_file(FileSystems.join(folder, PLAN_FILE)) or {}
    timeline = read_file(FileSystems.join(folder, TIMELINE_FILE)) or {}
    earlier = None
    recent = [r for r in timeline.get("recent") or [] if isinstance(r, list) and len(r) == 2]
    if state == "running" and recent:
        earlier = (float(recent[0][0]), recent[0][1])
    figures = view(counts, plan, earlier, now if earlier else None)
    if state != "running":
        figures["eta_s"] = None
    started = plan.get("started")
    ago = f"{now - updated:,.0f} s ago" if updated else "?"
    lines.append(f"progress from {workers} worker file{'s' if workers != 1 else ''}, last updated {ago}"
                 + (f", run started {_when(started)}" if started else ""))
    lines.append(f"  rows read    {_n(figures['read'])} of {_n(figures['total'])}"
                 + ("" if figures["total_known"] else " (estimated from bytes read)"))
    lines.append(f"  past fetch   {_n(figures['through_fetch'])}: fetched {figures['fetched']:,}"
                 + (f", ok {100.0 * figures['success']:.1f}%" if figures["success"] is not None else "")
                 + (f", resumed {figures['resumed']:,}" if figures["resumed"] else ""))
    if figures["top_errors"]:
        lines.append(f"  top errors   {format_errors(figures['top_errors'])}")
    lines.append(f"  decoded      {figures['decoded']:,}")
    lines.append(f"  written      {figures['written']:,} ledger rows, kept {figures['kept']:,}")
    if figures["rate"] is not None:
        lines.append(f"  rate         {figures['rate']:,.1f} rows/s over the last {figures['window_s']:,.0f} s"
                     + (f", ETA {duration(figures['eta_s'])}" if figures["eta_s"] is not None else ""))
    lines.append(f"  phase        {figures['phase']}" + ("" if state == "running" else " (when it stopped)"))
    return lines


def _when(started: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(started)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(started)
