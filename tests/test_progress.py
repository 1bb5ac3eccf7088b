"""Progress: worker tallies and files, the figures and lines, `paircurate status` on live and killed runs."""
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import generated_rows
from paircurate import progress
from paircurate.config import load_config
from paircurate.progress import (
    Reporter,
    format_line,
    input_size,
    read_workers,
    status_lines,
    tally,
    thin,
    throughput_series,
    view,
)
from paircurate.run import run_pipeline
from paircurate.transforms.read import plan_reads

# --------------------------------------------------------------------------- figures

def test_view_counts_every_row_past_fetch_and_takes_rates_over_the_window():
    plan = {"rows": 1000, "bytes": None}
    before = {"read/rows": 1000, "fetch/ok": 100, "fetch/http_404": 10, "fetch/passed": 40}
    now = dict(before, **{"fetch/ok": 150, "fetch/http_429": 40, "fetch/passed": 50,
                          "resize/ok": 120, "ledger/ok": 0})
    figures = view(now, plan, earlier=(100.0, before), now=120.0)
    assert figures["through_fetch"] == 150 + 10 + 40 + 50
    assert figures["fetched"] == 200 and figures["fetch_ok"] == 150
    # In the window: 50 ok, 40 http_429 (a wave of 429s shows now, not diluted by the run so far).
    assert figures["success"] == pytest.approx(50 / 90)
    assert figures["top_errors"] == [("http_429", 40)]
    assert figures["rate"] == pytest.approx((250 - 150) / 20)
    assert figures["eta_s"] == pytest.approx((1000 - 250) / 5.0)
    assert figures["phase"] == "fetching"
    line = format_line(figures)
    assert line == ("read 1,000/1,000 | past fetch 250/1,000 (25%) | fetched 200 ok 55.6% (http_429 40) | "
                    "decoded 120 | kept 0 of 0 written | 5.0 rows/s | ETA 0:02:30 | fetching")
    assert "rows/s" not in format_line(figures, short=True)  # the bar shows rate and ETA


def test_text_inputs_estimate_rows_from_bytes_until_read_through():
    plan = {"rows": None, "bytes": 1000}
    assert view({"read/rows": 30, "read/bytes": 250}, plan)["total"] == 120
    assert view({"read/rows": 118, "read/bytes": 1000}, plan)["total"] == 118  # all read: exact
    assert view({}, plan)["total"] is None and view({}, plan)["phase"] == "reading"


def test_input_size_from_parquet_footers_and_text_bytes(tmp_path, parquet_input):
    path = parquet_input([{"url": f"http://h/{i}", "caption": "a caption"} for i in range(25)],
                         row_group_size=10)
    config = load_config().input
    assert input_size(plan_reads(path, config)) == {"rows": 25, "bytes": None}
    text = tmp_path / "in.jsonl"
    text.write_text("".join(json.dumps({"url": f"http://h/{i}"}) + "\n" for i in range(50)))
    config.split_bytes = 300
    tasks = plan_reads(str(text), config)
    assert len(tasks) > 1
    assert input_size(tasks) == {"rows": None, "bytes": os.path.getsize(text)}


def test_timeline_is_bounded_and_gives_rows_per_second():
    points = [[10.0 * i, 0, 30 * i, 0, 0] for i in range(2000)]
    kept = thin(points, limit=100)
    assert len(kept) <= 100 and kept[0] == points[0] and kept[-1] == points[-1]
    series = throughput_series(kept)
    assert series and all(rate == pytest.approx(3.0) for _, _, rate in series)


# --------------------------------------------------------------------------- worker files

def _worker(folder, n):
    counter = tally(folder)
    for _ in range(n):
        counter.add("fetch/ok")
    counter.add("fetch/http_404", 2)
    # no explicit flush: the last counts reach the file as the process exits


def test_progress_files_are_written_per_process_and_summed(tmp_path):
    folder = str(tmp_path / "progress")
    os.makedirs(folder)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(folder, n)) for n in (100, 250, 7)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    counts, files, updated = read_workers(folder)
    assert files == 3 and updated
    assert counts == {"fetch/ok": 357, "fetch/http_404": 6}
    assert not [name for name in os.listdir(folder) if ".tmp-" in name]  # written, then renamed


def test_a_worker_never_brings_back_a_deleted_work_folder(tmp_path):
    folder = tmp_path / "_work" / "progress"
    folder.mkdir(parents=True)
    counter = progress.Tally(str(folder), flush_seconds=3600)
    counter.add("read/rows", 5)
    counter.flush()
    assert read_workers(str(folder))[0] == {"read/rows": 5}
    for name in os.listdir(folder):
        os.unlink(folder / name)
    os.rmdir(folder)
    os.rmdir(tmp_path / "_work")  # finalisation deleted _work
    counter.add("read/rows", 1)
    counter.close()
    assert not (tmp_path / "_work").exists()


def test_plain_lines_every_30_seconds_when_not_on_a_terminal(tmp_path):
    folder = tmp_path / "progress"
    folder.mkdir()
    (folder / "worker-a.json").write_text(json.dumps({"counts": {"read/rows": 10, "fetch/ok": 4}, "updated": 1}))
    clock = iter([1000.0, 1001.0, 1020.0, 1031.0, 1045.0, 1062.0, 1062.0])
    stream = io.StringIO()
    reporter = Reporter(str(folder), {"rows": 10}, display="lines", stream=stream, clock=lambda: next(clock))
    for _ in range(5):
        reporter.poll()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # at 31 s and 62 s, nothing in between
    assert lines[0].startswith("progress 0:00:31: read 10/10 | past fetch 4/10 (40%) | fetched 4 ok 100.0%")
    summary = reporter.stop()
    assert summary["counts"] == {"read/rows": 10, "fetch/ok": 4}
    assert summary["timeline"][0][2] == 4


# --------------------------------------------------------------------------- whole runs

def test_multi_process_run_sums_progress_to_the_ledger(tmp_path, serve_images, parquet_input):
    items = serve_images(30)
    rows = [{"url": url, "caption": caption} for url, caption, _ in items]
    rows += [{"url": "notaurl", "caption": "a caption here"}, {"url": items[0][0], "caption": "hi"}]
    host = items[0][0].split("/")[2]
    config = load_config(overrides=[f"fetch.allowed_hosts=[{host}]", "clip.enabled=false", "output.report=false",
                                    "runner.direct_running_mode=multi_processing", "runner.direct_num_workers=2"])
    out = str(tmp_path / "out")
    stats = run_pipeline(parquet_input(rows, row_group_size=8), out, config)
    counts = stats["progress"]["counts"]
    assert stats["progress"]["worker_files"] >= 1
    assert counts["read/rows"] == stats["rows_in"] == len(rows)
    assert sum(v for k, v in counts.items() if k.startswith("fetch/")) == len(rows)
    assert counts["fetch/ok"] == 30
    ledger = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("ledger/")}
    assert ledger == {k: v for k, v in stats["by_status"].items() if v}
    assert not os.path.exists(os.path.join(out, "_work"))  # progress files go with _work


class StallingRoutes(dict):
    """Serves the first ``free`` images at once; the rest wait until ``release`` is set."""

    def __init__(self, routes, free):
        super().__init__(routes)
        self.free = set(list(routes)[:free])
        self.release = threading.Event()

    def get(self, path, default=None):
        if path not in self.free:
            self.release.wait(120)
        return super().get(path, default)


N_ROWS, FREE = 40, 24


def stalled_run(tmp_path, image_server, parquet_input, *extra):
    routes, rows = generated_rows(image_server, N_ROWS, "s", 52000)
    stalling = StallingRoutes(routes, FREE)
    image_server.use_routes(stalling)
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "paircurate.cli", "run", "--input", parquet_input(rows, row_group_size=10),
               "--output", out, *extra]
    for item in (f"fetch.allowed_hosts=[{image_server.host_port}]", "fetch.threads=2", "fetch.retries=0",
                 "fetch.timeout=300", "clip.enabled=false", "output.report=false"):
        command += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    return process, stalling, out


def wait_for(condition, process, what, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {limit} s")


def fetched_so_far(out):
    return read_workers(os.path.join(out, "_work", "progress"))[0].get("fetch/ok", 0)


def test_status_of_a_running_run_and_plain_lines(tmp_path, image_server, parquet_input):
    process, stalling, out = stalled_run(tmp_path, image_server, parquet_input, "--progress-every", "0.5")
    try:
        stderr_lines = []
        reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
        reader.start()
        wait_for(lambda: fetched_so_far(out) >= FREE, process, "the free images were fetched")
        lines = status_lines(out)
        assert lines[0].startswith(f"{out}: running (pid {process.pid} ")
        text = "\n".join(lines)
        assert f"rows read    {N_ROWS} of {N_ROWS}" in text
        assert f"fetched {FREE}, ok 100.0%" in text
        assert "phase        fetching" in text
        # The run's own stderr (a pipe, not a terminal) carries plain progress lines.
        wait_for(lambda: any(line.startswith("progress ") and f"fetched {FREE}" in line for line in stderr_lines),
                 process, "a progress line")
    finally:
        stalling.release.set()
    process.wait(300)
    reader.join(10)
    assert process.returncode == 0, "".join(stderr_lines)
    assert not any("\r" in line for line in stderr_lines)  # no bar drawn where no terminal is
    assert status_lines(out)[0] == f"{out}: finished"
    assert f"rows in {N_ROWS}, kept {N_ROWS}" in status_lines(out)[1]


def test_status_of_a_killed_run(tmp_path, image_server, parquet_input):
    process, stalling, out = stalled_run(tmp_path, image_server, parquet_input, "--quiet")
    try:
        wait_for(lambda: fetched_so_far(out) >= FREE, process, "the free images were fetched")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        stalling.release.set()
    assert process.stderr.read() == ""  # --quiet: no progress shown
    lines = status_lines(out)
    assert lines[0].startswith(f"{out}: interrupted: the run that held the folder is gone (pid {process.pid} ")
    text = "\n".join(lines)
    assert f"fetched {FREE}, ok 100.0%" in text and "(when it stopped)" in text
    assert "ETA" not in text
    result = subprocess.run([sys.executable, "-m", "paircurate.cli", "status", out], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0 and result.stdout.splitlines()[0] == lines[0]


def test_status_of_a_folder_without_a_run(tmp_path):
    assert status_lines(str(tmp_path)) == [f"{tmp_path}: no paircurate run here"]


def test_beam_bigquery_note_is_not_shown():
    script = ("import sys; sys.modules['apitools'] = None\n"  # as where the [gcp] extra is not installed
              "{}\nimport apache_beam.io.gcp.internal.clients.bigquery\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    bare = subprocess.run([sys.executable, "-c", script.format("")], capture_output=True, text=True, env=env)
    assert "apitools not found" in bare.stderr  # the note this filter is for
    quiet = subprocess.run([sys.executable, "-c", script.format("import paircurate.cli")], capture_output=True,
                           text=True, env=env)
    assert quiet.returncode == 0 and "apitools not found" not in quiet.stderr


# --------------------------------------------------------------------------- report and remote runners

def test_report_draws_rows_per_second_over_time():
    from paircurate.report.render import fragment, timeline_rows

    def timeline_html(stats):
        return fragment("sections/timeline.html.j2", timeline=timeline_rows(stats))

    points = [[0.0, 100, 0, 0, 0], [10.0, 100, 50, 40, 0], [20.0, 100, 100, 80, 0], [30.0, 100, 100, 80, 100]]
    html = timeline_html({"progress": {"timeline": points}})
    rates = [float(v) for v in re.findall(r'data-rate="([0-9.]+)"', html)]
    assert rates == [5.0, 5.0, 0.0]
    assert "No progress timeline" in timeline_html({})


class FakeCounter:
    def __init__(self, namespace, name, value):
        from types import SimpleNamespace
        self.key = SimpleNamespace(metric=SimpleNamespace(namespace=namespace, name=name))
        self.attempted, self.committed = value, None


class FakeResult:
    def __init__(self, counters, job="2026-11-27_01_02_03-123"):
        self._counters, self._job = counters, job

    def metrics(self):
        counters = self._counters
        from types import SimpleNamespace
        return SimpleNamespace(query=lambda _filter: {"counters": counters})

    def job_id(self):
        return self._job


def test_remote_runner_metrics_give_the_same_counts_and_the_job_is_named():
    from apache_beam.options.pipeline_options import PipelineOptions

    from paircurate.run import job_lines, metric_counts

    result = FakeResult([FakeCounter("read", "rows", 10), FakeCounter("fetch", "ok", 6),
                         FakeCounter("fetch", "ok", 1), FakeCounter("fetch", "bytes", 9999),
                         FakeCounter("fetch", "http_404", 2), FakeCounter("resize", "ok", 5),
                         FakeCounter("shuffle", "GroupPairs", 77)])
    assert metric_counts(result) == {"read/rows": 10, "fetch/ok": 7, "fetch/http_404": 2, "resize/ok": 5}
    assert job_lines(result, PipelineOptions([])) == ["job id: 2026-11-27_01_02_03-123"]

    class DataflowPipelineResult(FakeResult):
        pass

    options = PipelineOptions(["--region=us-central1", "--project=P"])
    assert job_lines(DataflowPipelineResult([]), options)[1] == (
        "console: https://console.cloud.google.com/dataflow/jobs/us-central1/2026-11-27_01_02_03-123?project=P")
