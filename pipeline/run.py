"""Running the pipeline: output folder checks, runner options, finalisation (stats, manifest, _SUCCESS)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions

from paircurate import __version__
from paircurate.config import Config
from paircurate.graph import REJECTED_FILE, SEMANTIC_REJECTED_FILE, OutputLayout, build, plan_input
from paircurate.lock import LockError, OutputLock
from paircurate.transforms.beam_util import LOCAL_RUNNERS, make_pipeline
from paircurate.transforms.files import read_json, write_json
from paircurate.transforms.schema import STATUS_ORDER, funnel

if TYPE_CHECKING:  # imported where it is used: the display is loaded only for a run
    from paircurate.progress import Reporter

_LOG = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
#: Written when a run starts in a folder (what started it, when): the folder's
#: files are paircurate's, so an unfinished run may be cleared without --overwrite.
RUN_MARKER = "_PAIRCURATE_RUN"
#: What a run writes under its output folder; cleared before a (re)run.
RUN_OUTPUTS = ("shards", "metadata", "embeddings", "_work", "stats.json", "manifest.json",
               "report.html", "report.html.incomplete", SUCCESS_MARKER)
#: Names under the output folder that survive the clearing of an unfinished
#: paircurate run (work a rerun resumes from: staged images); --overwrite deletes them too.
RESUMABLE: Tuple[str, ...] = ("_staging",)


class RunError(RuntimeError):
    """The run cannot start or finish as asked; the message says why."""


def is_finished(root: str) -> bool:
    return FileSystems.exists(FileSystems.join(root, SUCCESS_MARKER))


def is_paircurate_run(root: str) -> bool:
    """True when paircurate started a run here (its marker), or finished one (_SUCCESS)."""
    return FileSystems.exists(FileSystems.join(root, RUN_MARKER)) or is_finished(root)


def prepare_output(root: str, overwrite: bool, command: Optional[str] = None) -> None:
    """Make ``root`` ready for a new run, or refuse.

    A finished run is replaced only with ``overwrite``; files paircurate did not
    write (no marker, no _SUCCESS) are deleted only with ``overwrite``; what an
    unfinished paircurate run left is cleared, except the RESUMABLE names.
    The marker is written before anything is deleted and _SUCCESS is deleted
    first, so a kill at any point leaves a folder that is recognisably an
    unfinished paircurate run, never a "finished" one with parts missing.
    Callers hold the folder's lock (claim_output).
    """
    finished = is_finished(root)
    if finished and not overwrite:
        raise RunError(f"{root} already holds a finished run; pass --overwrite to replace it")
    names = RUN_OUTPUTS + RESUMABLE
    present = [name for name in names if FileSystems.exists(FileSystems.join(root, name))]
    if present and not overwrite and not is_paircurate_run(root):
        raise RunError(f"{root} holds {', '.join(present)}, which paircurate did not write "
                       f"(no {RUN_MARKER} marker); pass --overwrite to delete them, or choose another folder")
    if "://" not in root:
        os.makedirs(root, exist_ok=True)
    write_marker(root, {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "host": platform.node(), "pid": os.getpid(), "paircurate": __version__})
    if SUCCESS_MARKER in present:
        FileSystems.delete([FileSystems.join(root, SUCCESS_MARKER)])
    keep = () if overwrite else RESUMABLE
    stale = [FileSystems.join(root, name) for name in present if name != SUCCESS_MARKER and name not in keep]
    if stale:
        FileSystems.delete(stale)


def write_marker(root: str, info: Dict[str, Any]) -> None:
    """Write the run marker; on a local disk it replaces the old one atomically, never leaving none."""
    # Object stores: delete-then-rename, a short window without a marker.
    write_json(FileSystems.join(root, RUN_MARKER), info)


@contextlib.contextmanager
def claim_output(root: str, overwrite: bool, command: Optional[str] = None) -> Iterator[OutputLock]:
    """Lock ``root`` for this run, prepare it, and release the lock at the end (success or failure)."""
    command = command if command is not None else " ".join(sys.argv)
    try:
        lock = OutputLock.acquire(root, command)
    except LockError as exc:
        raise RunError(str(exc)) from None
    try:
        prepare_output(root, overwrite, command)
        yield lock
    finally:
        lock.release()


def beam_options(config: Config, extra_args: Sequence[str] = ()) -> PipelineOptions:
    args: List[str] = []
    if config.runner.runner in LOCAL_RUNNERS:
        args += [f"--direct_running_mode={config.runner.direct_running_mode}",
                 f"--direct_num_workers={config.runner.direct_num_workers}"]
    args += option_flags(config.runner.options)
    args += list(extra_args)  # the command line has the last word
    return PipelineOptions(args)


def option_flags(options: Dict[str, Any]) -> List[str]:
    """{key: value} -> Beam flags; a list repeats the flag, true is a bare flag, null is skipped."""
    flags: List[str] = []
    for key, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None or item is False:
                continue
            flags.append(f"--{key}" if item is True else f"--{key}={item}")
    return flags


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    found = {"paircurate": __version__, "python": platform.python_version()}
    for name in ("apache-beam", "img2dataset", "open_clip_torch", "torch", "pyarrow", "imagehash"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def build_stats(counts: Dict[str, Any], manifest: List[Dict[str, Any]], config: Config,
                started: float, finished: float, rows_read: Optional[int]) -> Dict[str, Any]:
    """stats.json: counts per status and error class, totals, timings and throughput."""
    duration = max(finished - started, 1e-9)
    by_status = {status: counts["by_status"].get(status, 0) for status in STATUS_ORDER}
    stats: Dict[str, Any] = {
        "rows_in": rows_read if rows_read is not None else counts["rows"],
        "ledger_rows": counts["rows"],
        "by_status": by_status,
        "errors": counts["errors"],
        "kept": by_status.get("ok", 0),
        "shards": len(manifest),
        "shard_bytes": sum(e["bytes"] for e in manifest),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "duration_s": round(duration, 3),
        "rows_per_s": round(counts["rows"] / duration, 2),
        "config": config.to_dict(),
        "versions": versions(),
    }
    # Rows removed/remaining per stage in the status registry's order, the same numbers
    # report.html shows, so monitoring can read them from stats.json.
    stats["funnel"] = funnel(by_status)
    if config.clip.enabled:
        from paircurate.transforms.clip import model_description
        stats["clip_model"] = model_description(config.clip)
    return stats


def stage_timings(result) -> Dict[str, Dict[str, float]]:
    """Per-stage work time from Beam metrics: records, busy seconds (summed over threads), ms per record.

    Per-record stages (transforms/stage.py: validate, caption) and the threaded ones (fetch,
    decode/resize) record the time of each record's work; CLIP records RunInference's batch
    latency.  Shuffle-bound stages (dedup, shard
    numbering) have no per-record work to time and are not listed.
    """
    from apache_beam.metrics.metric import MetricsFilter

    from paircurate.transforms.beam_util import WORK_TIME_METRIC

    stages: Dict[str, Dict[str, float]] = {}
    try:
        distributions = result.metrics().query(MetricsFilter())["distributions"]
    except Exception:  # some runners report no metrics
        return stages
    for item in distributions:
        name, namespace = item.key.metric.name, item.key.metric.namespace
        value = item.committed or item.attempted
        if value is None or not value.count:
            continue
        if name == WORK_TIME_METRIC:
            stage, records = namespace, value.count
        elif name == "inference_batch_latency_micro_secs":
            stage, records = "clip", None
        else:
            continue
        entry = stages.setdefault(stage, {"records": 0, "busy_s": 0.0})
        entry["busy_s"] += value.sum / 1e6
        if records is not None:
            entry["records"] += records
    for name, entry in stages.items():
        if name == "clip":
            entry["records"] = counter_total(result, "num_inferences") or 0
        entry["busy_s"] = round(entry["busy_s"], 3)
        entry["ms_per_record"] = round(1000 * entry["busy_s"] / entry["records"], 3) if entry["records"] else None
    return stages


def counter_total(result, name: str, namespace: Optional[str] = None) -> Optional[int]:
    """A Beam counter summed over the steps that use it; None where the runner reports no metrics."""
    from apache_beam.metrics.metric import MetricsFilter

    query = MetricsFilter().with_name(name)
    if namespace:
        query = query.with_namespace(namespace)
    try:
        counters = result.metrics().query(query)["counters"]
    except Exception:  # some runners report no metrics
        return None
    if not counters:  # the runner reported no such counter (Spark's job server may not): unknown, not 0
        return None
    return int(sum(c.committed or c.attempted or 0 for c in counters))


def input_rows(result) -> Optional[int]:
    """Input rows the readers emitted (the "read/rows" counter), to check the ledger against."""
    return counter_total(result, "rows", "read")


def wait_until_done(result) -> None:
    """Wait for the pipeline; a run that did not end DONE is an error, and nothing is marked finished."""
    state = result.wait_until_finish()
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise RunError(f"the pipeline ended in state {state}; the output is not marked finished")


# --- progress (owned by paircurate.progress) ---------------------------------------------

def job_lines(result, options: PipelineOptions) -> List[str]:
    """What a remote runner's job is called and where to watch it (Dataflow: its console URL)."""
    job_id = None
    if callable(getattr(result, "job_id", None)):
        try:
            job_id = result.job_id()
        except Exception:  # noqa: BLE001 - a runner without a job id
            job_id = None
    job_id = job_id or getattr(result, "_job_id", None)
    if not job_id:
        return []
    lines = [f"job id: {job_id}"]
    if type(result).__name__ == "DataflowPipelineResult":
        from apache_beam.options.pipeline_options import GoogleCloudOptions

        gcp = options.view_as(GoogleCloudOptions)
        lines.append(f"console: https://console.cloud.google.com/dataflow/jobs/{gcp.region}/{job_id}"
                     f"?project={gcp.project}")
    return lines


def metric_counts(result) -> Dict[str, int]:
    """Progress counts from a runner's metrics (the read rows and the fetch and decode outcomes)."""
    from apache_beam.metrics.metric import MetricsFilter

    counts: Dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace, name = counter.key.metric.namespace, counter.key.metric.name
        if (namespace, name) == ("read", "rows") or (namespace in ("fetch", "resize") and name != "bytes"):
            key = f"{namespace}/{name}"
            counts[key] = counts.get(key, 0) + int(counter.attempted or counter.committed or 0)
    return counts


@contextlib.contextmanager
def watched(layout: OutputLayout, size: Dict[str, Any], display: str, runner: str,
            summary: Dict[str, Any], line_seconds: Optional[float] = None) -> Iterator["Reporter"]:
    """Sum the workers' progress files while the body runs the pipeline; ``summary`` gets the result."""
    from paircurate.progress import LINE_SECONDS, POLL_SECONDS, REMOTE_POLL_SECONDS, Reporter

    poll = POLL_SECONDS if runner in LOCAL_RUNNERS else REMOTE_POLL_SECONDS  # object stores: fewer reads
    reporter = Reporter(layout.progress, {**size, "runner": runner}, display,
                        line_seconds=line_seconds or LINE_SECONDS, poll_seconds=poll).start()
    redirect = contextlib.nullcontext()
    if display == "bar":  # log lines printed above the bars, not through them
        from tqdm.contrib.logging import logging_redirect_tqdm
        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            yield reporter
    finally:
        summary.update(reporter.stop())


def start_and_wait(pipeline, options: PipelineOptions, reporter, remote: bool):
    """Run the pipeline; a remote job's id (and console URL) is printed, its metrics feed the display."""
    result = pipeline.run()
    lines = job_lines(result, options) if remote else []
    if lines:  # a remote job: printed whatever the display, the job id is how one finds it again
        reporter.metrics = lambda: metric_counts(result)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
    wait_until_done(result)
    return result

# --- end progress


def run_pipeline(input_pattern: str, output_root: str, config: Config,
                 extra_args: Sequence[str] = (), overwrite: bool = False,
                 display: str = "off", line_seconds: Optional[float] = None) -> Dict[str, Any]:
    """Run the whole job; return the stats written to stats.json.

    ``display``: how progress is shown while it runs (paircurate.progress.Reporter):
    "bar" (tqdm, on a terminal), "lines" (a plain line every ``line_seconds``, 30 s) or "off".
    """
    layout = OutputLayout(output_root)
    plan = plan_input(input_pattern, config)  # fails early on missing or unreadable input
    options = beam_options(config, extra_args)
    dry_run = options.view_as(TestOptions).dry_run
    if dry_run:  # Dataflow's --dry_run builds the job and submits nothing: no output touched
        pipeline = make_pipeline(config.runner.runner, options)
        build(pipeline, plan, config, layout, resume=False)
        result = pipeline.run()
        return {"dry_run": True, "job": getattr(result, "job", None), "pipeline": pipeline}
    from paircurate.progress import input_size

    with claim_output(output_root, overwrite):
        started = time.time()
        pipeline = make_pipeline(config.runner.runner, options)
        build(pipeline, plan, config, layout)
        progress: Dict[str, Any] = {}
        with watched(layout, input_size(plan.tasks), display, config.runner.runner, progress,
                     line_seconds) as reporter:
            result = start_and_wait(pipeline, options, reporter,
                                    remote=config.runner.runner not in LOCAL_RUNNERS)
        rows = input_rows(result)
        return finalise(layout, config, started, rows,
                        {"stages": stage_timings(result), **shuffle_stats(result, rows),
                         "resumed_rows": counter_total(result, "resumed_rows", "staging") or 0,
                         "progress": progress,
                         "dedup": {name: counter_total(result, name, "dedup")
                                   for name in ("verified_pairs", "rejected_pairs")},
                         **semantic_stats(result, config)})


def semantic_stats(result, config: Config) -> Dict[str, Any]:
    """stats.json "semantic": semantic dedup's pair counts (nearest rejected: added by finalise)."""
    if not (config.clip.enabled and config.dedup.semantic.enabled):
        return {}
    return {"semantic": {name: counter_total(result, name, "semantic") or 0
                         for name in ("candidate_pairs", "verified_pairs", "rejected_pairs",
                                      "bucket_overflows")}}


def shuffle_stats(result, rows: Optional[int]) -> Dict[str, Any]:
    """Encoded bytes that entered the run's shuffles and side inputs (beam_util.metered).

    One counter per metered step, in the "shuffle" namespace; stats.json gets
    the total, the total per input row, and the steps' own figures.
    """
    from apache_beam.metrics.metric import MetricsFilter

    from paircurate.transforms.beam_util import SHUFFLE_NAMESPACE

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(SHUFFLE_NAMESPACE))["counters"]
    except Exception:  # some runners report no metrics
        return {"shuffle_bytes": None, "shuffle_bytes_per_row": None}
    steps: Dict[str, int] = {}
    for counter in counters:
        name = counter.key.metric.name
        steps[name] = steps.get(name, 0) + int(counter.committed or counter.attempted or 0)
    total = sum(steps.values())
    return {"shuffle_bytes": total,
            "shuffle_bytes_per_row": round(total / rows, 1) if rows else None,
            "shuffle_bytes_by_step": dict(sorted(steps.items(), key=lambda kv: -kv[1]))}


def finalise(layout: OutputLayout, config: Config, started: float, rows_read: Optional[int],
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Turn the pipeline's work files into stats.json and manifest.json, then mark success.

    ``extra`` is merged into stats.json (before the report is drawn and
    _SUCCESS is written, so nothing is rewritten after the run is finished).
    """
    counts = read_json(FileSystems.join(layout.work, "counts.json"))
    if rows_read is not None and rows_read != counts["rows"]:
        raise RunError(f"ledger has {counts['rows']} rows for {rows_read} input rows: "
                       "records were lost; the output is not marked finished")
    manifest = read_json(FileSystems.join(layout.work, "manifest.json"))
    stats = build_stats(counts, manifest, config, started, time.time(), rows_read)
    stats["stages"] = {}
    stats.update(extra or {})
    rejected = FileSystems.join(layout.work, REJECTED_FILE)
    if FileSystems.exists(rejected):
        stats.setdefault("dedup", {})["nearest_rejected"] = [
            dict(zip(("verify", "distance", "signal", "uid_a", "uid_b"), pair))
            for pair in read_json(rejected)]
    semantic_rejected = FileSystems.join(layout.work, SEMANTIC_REJECTED_FILE)
    if FileSystems.exists(semantic_rejected):
        stats.setdefault("semantic", {})["nearest_rejected"] = [
            dict(zip(("cosine", "uid_a", "uid_b"), pair)) for pair in read_json(semantic_rejected)]
    write_json(layout.file("manifest.json"), manifest)
    write_json(layout.file("stats.json"), stats)
    if config.output.report:
        # The report is a view of the data, not the data: a failure to draw it
        # is logged and does not fail a run whose shards and ledger are complete.
        try:
            from paircurate.report import write_report
            write_report(layout.root)
        except Exception as exc:  # noqa: BLE001
            _LOG.warning("report.html was not written: %s (rebuild it with `paircurate report %s`)",
                         exc, layout.root)
    FileSystems.delete([layout.work])
    staging = layout.file("_staging")
    if FileSystems.exists(staging):  # staged images are in the shards now
        FileSystems.delete([staging])
    handle = FileSystems.create(layout.file(SUCCESS_MARKER))
    handle.close()
    return stats


# --- nightly incremental runs -------------------------------------------------

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def run_dir(root: str, run_id: str) -> str:
    """ROOT/runs/<run-id>: where one nightly run writes."""
    if not _RUN_ID.match(run_id):
        raise RunError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-' (e.g. 2026-11-26)")
    return FileSystems.join(FileSystems.join(root, "runs"), run_id)


def earlier_runs(root: str, run_id: str) -> List[str]:
    """Finished runs under ROOT/runs whose id sorts before ``run_id`` (dates sort in time order)."""
    pattern = FileSystems.join(FileSystems.join(root, "runs"), "*", SUCCESS_MARKER)
    found = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    runs = sorted({path[: -len(SUCCESS_MARKER) - 1] for path in found})
    return [path for path in runs if path.rstrip("/").rsplit("/", 1)[-1] < run_id]


def history_globs(run_paths: Sequence[str]) -> List[str]:
    return [FileSystems.join(FileSystems.join(path, "metadata"), "*.parquet") for path in run_paths]


def run_nightly(input_pattern: str, root: str, run_id: str, config: Config,
                extra_args: Sequence[str] = (), display: str = "off",
                line_seconds: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """One incremental run: dedup against every earlier finished run under ROOT.

    Returns None (and does nothing) when this run id already succeeded; a run
    that failed half-way is started again from a clean folder.
    """
    target = run_dir(root, run_id)
    if is_finished(target):
        return None
    earlier = earlier_runs(root, run_id)
    config.dedup.history = list(config.dedup.history) + history_globs(earlier)
    return run_pipeline(input_pattern, target, config, extra_args, overwrite=False, display=display,
                        line_seconds=line_seconds)
