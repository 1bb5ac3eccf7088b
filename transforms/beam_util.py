"""Runner selection and small Beam helpers shared by the pipeline and the tests."""
from __future__ import annotations

import logging
from typing import Any, Iterable, List, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindows

_LOG = logging.getLogger(__name__)

#: Names that mean "run locally in this Python process (or its workers)".
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "direct", "local")


def runner_for(name: str) -> Union[str, object]:
    """The runner to hand to beam.Pipeline.

    Beam 2.77's DirectRunner first tries the Prism runner, whose binary it
    downloads from GitHub; offline that stalls and fails before it falls back
    to the Python FnApiRunner.  paircurate asks for the FnApiRunner directly,
    which honours --direct_running_mode and --direct_num_workers.
    """
    if name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        return fn_runner.FnApiRunner()
    return name


def make_pipeline(runner: str = "DirectRunner",
                  options: Optional[Union[PipelineOptions, Sequence[str]]] = None) -> beam.Pipeline:
    """A pipeline on the named runner (local runs use the FnApiRunner, see runner_for)."""
    if options is None or not isinstance(options, PipelineOptions):
        options = PipelineOptions(list(options or []))
    return beam.Pipeline(runner=runner_for(runner), options=options)


def local_pipeline() -> beam.Pipeline:
    """An in-process local pipeline for tests (use as a context manager)."""
    return make_pipeline("DirectRunner")


#: The name the tests use; marked so that pytest does not collect it as a test.
test_pipeline = local_pipeline
test_pipeline.__test__ = False  # type: ignore[attr-defined]


#: Distribution (microseconds per record) that concurrent stages record.
WORK_TIME_METRIC = "work_us"


class ConcurrentRecordFn(beam.DoFn):
    """A DoFn that runs ``work(record)`` for live records on a thread pool.

    Up to ``2 * threads`` records are in flight; results are emitted as they
    complete (with their input's timestamp and window), so one slow element
    holds only itself, never a batch.  Subclasses implement ``work`` (and may
    extend ``setup``); an exception in ``work`` marks the record instead of
    losing it.
    """

    #: Status and error class given to a record whose ``work`` raised.
    failure_status = None  # a paircurate.transforms.schema.Status
    failure_class = "internal"
    #: Beam metrics namespace for per-outcome counters.
    namespace = "work"

    def __init__(self, threads: int, progress: Optional[str] = None):
        self._threads = max(1, threads)
        self._max_in_flight = 2 * self._threads
        self._progress_dir = progress  # the run's progress folder (paircurate.progress); None: not counted

    def work(self, record) -> None:
        """A live record's work (on the pool): by default the stage contract's check(), then mark."""
        from paircurate.transforms.schema import mark

        verdict = self.check(record)
        if verdict is not None:
            mark(record, *verdict)

    def check(self, record):  # pragma: no cover - abstract: see paircurate.transforms.stage
        raise NotImplementedError

    def setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=self.namespace)
        self._counters = {}
        self._work_time = beam.metrics.Metrics.distribution(self.namespace, WORK_TIME_METRIC)
        from paircurate.transforms.tally import PASSED, RESUMED, tally
        self._tally = tally(getattr(self, "_progress_dir", None))
        self._passed_keys = {True: f"{self.namespace}/{RESUMED}", False: f"{self.namespace}/{PASSED}"}

    def start_bundle(self) -> None:
        import queue

        self._done = queue.SimpleQueue()
        self._in_flight = 0

    def _run(self, item) -> None:
        import time

        from paircurate.transforms.schema import mark

        record, timestamp, window = item
        started = time.perf_counter()
        try:
            self.work(record)
        except Exception as exc:  # a bug must not lose the record: it is marked and counted
            mark(record, self.failure_status, f"{self.failure_class}: {type(exc).__name__}: {exc}"[:200])
        elapsed_us = int((time.perf_counter() - started) * 1e6)
        self._done.put((record, timestamp, window, elapsed_us))

    def count(self, record) -> None:
        from paircurate.transforms.schema import error_class, is_live

        name = "ok" if is_live(record) else (error_class(record.get("error")) or record["status"])
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(self.namespace, name)
        self._counters[name].inc()
        if self._tally is not None:
            self._tally.add(f"{self.namespace}/{name}")

    def _emit(self, block: bool):
        import queue

        from apache_beam.utils.windowed_value import WindowedValue

        while self._in_flight:
            try:
                record, timestamp, window, elapsed_us = self._done.get(block=block)
            except queue.Empty:
                return
            self._in_flight -= 1
            self.count(record)
            # Per-record work time (read by paircurate.run.stage_timings for stats.json).
            self._work_time.update(elapsed_us)
            yield WindowedValue(record, timestamp, (window,))
            block = False  # after one blocking wait, take only what is ready

    def process(self, record, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        from paircurate.transforms.schema import is_live

        # A record restored from staging (a resumed run) has its image already: no work.
        if not is_live(record) or record.get("image_ref"):
            if self._tally is not None:  # progress: every row passes this stage, worked on or not
                self._tally.add(self._passed_keys[is_live(record)])
            yield record
            return
        self._executor.submit(self._run, (record, timestamp, window))
        self._in_flight += 1
        yield from self._emit(block=self._in_flight >= self._max_in_flight)

    def finish_bundle(self):
        while self._in_flight:
            yield from self._emit(block=True)

    def teardown(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


# --- shuffle volume ---------------------------------------------------------------------------

class BatchedFn(beam.DoFn):
    """A DoFn over batches: a bundle's elements are gathered ``batch`` at a time (the rest at
    the bundle's end) and handed to ``emit_batch``, whose outputs are the DoFn's."""

    def __init__(self, batch: int):
        self._batch = batch

    def emit_batch(self, batch: List[Any]) -> Iterable[Any]:
        raise NotImplementedError

    def start_bundle(self):
        self._buffer: List[Any] = []

    def _flush(self) -> Iterable[Any]:
        batch, self._buffer = self._buffer, []
        return self.emit_batch(batch) if batch else ()

    def process(self, element):
        self._buffer.append(element)
        if len(self._buffer) >= self._batch:
            yield from self._flush()

    def finish_bundle(self):
        for output in self._flush():
            yield GlobalWindows.windowed_value(output)


#: Beam metrics namespace of the shuffle meter (stats.json: shuffle_bytes).
SHUFFLE_NAMESPACE = "shuffle"


class _MeterFn(beam.DoFn):
    """Counts the encoded bytes of the elements about to enter a shuffle (or a side input).

    The element is encoded with the coder its PCollection uses, so the figure is
    what the runner moves, less the runner's own framing.
    """

    def __init__(self, coder, label: str):
        self._coder = coder
        self._label = label

    def setup(self):
        self._bytes = beam.metrics.Metrics.counter(SHUFFLE_NAMESPACE, self._label)

    def process(self, element):
        self._bytes.inc(len(self._coder.encode(element)))
        yield element


def metered(pcoll, label: str):
    """``pcoll`` unchanged, its encoded bytes counted as shuffle volume (use before a side input)."""
    coder = beam.coders.registry.get_coder(pcoll.element_type)
    return pcoll | f"{label}Meter" >> beam.ParDo(_MeterFn(coder, label))


def metered_group(pcoll, label: str):
    """GroupByKey with the bytes entering it counted."""
    return metered(pcoll, label) | label >> beam.GroupByKey()


def metered_cogroup(pcolls, label: str):
    """CoGroupByKey of a dict of PCollections with the bytes entering it counted."""
    return ({tag: metered(pc, f"{label}{tag.capitalize()}") for tag, pc in pcolls.items()}
            | label >> beam.CoGroupByKey())
