"""Workers' progress tallies: in-memory counts per run, written to one file per process on a timer.

Stages raise counts such as ``read/rows``, ``fetch/ok`` or ``ledger/ok`` with one
dictionary increment per record (``tally(folder).add(key)``).  A timer thread rewrites the
process's file, ``OUT/_work/progress/worker-<host>-<pid>-<token>.json``, every
FLUSH_SECONDS when something changed, and once more when the process exits.  The launcher
side (paircurate.progress) sums the files.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

from paircurate.transforms.files import write_atomically

#: Seconds between rewrites of a worker's progress file (only when its counts changed).
FLUSH_SECONDS = 3.0
WORKER_PREFIX = "worker-"

#: Counts a stage keeps for records it does not work on (already decided, or resumed).
PASSED, RESUMED = "passed", "resumed"


def write_file(path: str, value: Any, create_folder: bool = False) -> bool:
    """Write JSON complete-then-rename; False (nothing written) when a local folder is gone.

    Workers never create the folder (``create_folder`` is the launcher's): a
    worker that flushes after finalisation deleted ``_work`` must not bring it back.
    """
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    try:  # a unique temporary name: the timer thread and the exit hook may both write
        write_atomically(path, data, temp=f"{path}.tmp-{uuid.uuid4().hex[:8]}", create_folder=create_folder)
    except FileNotFoundError:
        return False
    return True


class Tally:
    """One process's counts for one run, written to its own file on a timer (never per record)."""

    def __init__(self, folder: str, flush_seconds: float = FLUSH_SECONDS):
        self.folder = folder
        name = f"{WORKER_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
        self.path = f"{folder.rstrip('/')}/{name}"
        self.counts: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._flush_seconds = flush_seconds
        self._changed = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="paircurate-progress", daemon=True)
        self._thread.start()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + n
            self._changed = True

    def flush(self) -> None:
        with self._lock:
            if not self._changed:
                return
            counts, self._changed = dict(self.counts), False
        try:
            write_file(self.path, {"counts": counts, "updated": time.time(), "pid": os.getpid(),
                                   "host": socket.gethostname()})
        except Exception:  # noqa: BLE001 - progress must never fail a run
            pass

    def _loop(self) -> None:
        while not self._stopped.wait(self._flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stopped.set()
        self.flush()


_TALLIES: Dict[str, Tally] = {}
_TALLIES_LOCK = threading.Lock()


def tally(folder: Optional[str]) -> Optional[Tally]:
    """This process's tally for the run whose progress folder is ``folder`` (None: not counted)."""
    if not folder:
        return None
    found = _TALLIES.get(folder)
    if found is None:
        with _TALLIES_LOCK:
            found = _TALLIES.get(folder)
            if found is None:
                found = _TALLIES[folder] = Tally(folder)
    return found


def close_tallies(folder: Optional[str] = None) -> None:
    """Flush and stop this process's tallies (one run's, or all): the end of a run, or of the process."""
    with _TALLIES_LOCK:
        names = [folder] if folder else list(_TALLIES)
        closing = [_TALLIES.pop(name) for name in names if name in _TALLIES]
    for item in closing:
        item.close()


atexit.register(close_tallies)  # a worker process's last counts reach its file as it exits
