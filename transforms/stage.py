"""The contract of a per-record stage: look at one live record, say what is wrong with it, or nothing.

A stage subclasses RecordStage and implements ``check(record)``, which returns None (the
record goes on as it is; check may fill fields) or ``(Status, error)``.  The base does the
rest, the same way for every stage: records that an earlier stage already decided pass
untouched, a failing record is marked (schema.mark), each outcome is counted (a Beam counter
per status under the stage's ``namespace``), and the work time per record is recorded (the
WORK_TIME_METRIC distribution that stats.json's stage timings read).

Stages whose work waits on the network or on a decoder run it on a thread pool instead
(beam_util.ConcurrentRecordFn: same counters and metric); its ``work`` may be a ``check`` too.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import apache_beam as beam

from paircurate.transforms.beam_util import WORK_TIME_METRIC
from paircurate.transforms.schema import Status, is_live, mark

#: What check() returns: None (the record passes) or the status and error that end it.
Verdict = Optional[Tuple[Status, Optional[str]]]


class RecordStage(beam.DoFn):
    """A DoFn for a stage that decides on one record at a time (subclasses implement ``check``)."""

    #: Beam metrics namespace: per-status counters and the work-time distribution.
    namespace = "stage"

    def check(self, record: Dict[str, Any]) -> Verdict:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The stage on one record, inside Beam or not (tests): a live record is checked, and marked if it fails."""
        if is_live(record):
            verdict = self.check(record)
            if verdict is not None:
                mark(record, *verdict)
        return record

    def setup(self) -> None:
        self._counters: Dict[str, Any] = {}
        self._work_time = beam.metrics.Metrics.distribution(self.namespace, WORK_TIME_METRIC)

    def process(self, record):  # no type hints: Beam would read them as the element types
        if not is_live(record):  # decided by an earlier stage: passed on untouched, not counted
            yield record
            return
        started = time.perf_counter()
        self.apply(record)
        self._work_time.update(int((time.perf_counter() - started) * 1e6))
        status = record["status"]
        if status not in self._counters:
            self._counters[status] = beam.metrics.Metrics.counter(self.namespace, status)
        self._counters[status].inc()
        yield record
