"""The output folder: one run at a time (lock), never clearing what paircurate did not write (marker),
never a "finished" run with parts missing (_SUCCESS removed first)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from apache_beam.io.filesystems import FileSystems
from click.testing import CliRunner

from paircurate import run as run_module
from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.imageserver import Route
from paircurate.lock import LOCK_NAME, LockError, OutputLock, is_stale, lock_info
from paircurate.run import RUN_MARKER, RunError, prepare_output, run_nightly, run_pipeline


def config_for(server, *extra):
    return load_config(overrides=[f"fetch.allowed_hosts=[{server.host_port}]", "fetch.timeout=5",
                                  "fetch.retries=0", "dedup.enabled=false", "clip.enabled=false",
                                  "output.report=false", *extra])


def small_input(server, parquet_input, n=4):
    rows = []
    for i in range(n):
        image, caption = synthetic_image(4200 + i, size=(64, 64))
        server.routes[f"/o/{i}.jpg"] = Route(encode(image))
        rows.append({"url": server.url(f"/o/{i}.jpg"), "caption": caption})
    return parquet_input(rows, "small.parquet")


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(root, **changes):
    os.makedirs(root, exist_ok=True)
    info = dict(lock_info("paircurate run (an earlier one)"), **changes)
    with open(os.path.join(root, LOCK_NAME), "w") as handle:
        json.dump(info, handle)
    return info


# --- the lock ------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released(tmp_path):
    root = str(tmp_path / "out")
    first = OutputLock.acquire(root, "first")
    with pytest.raises(LockError, match=r"in use by another paircurate run \(pid \d+ .*command: first"):
        OutputLock.acquire(root, "second")
    first.release()
    assert not os.path.exists(os.path.join(root, LOCK_NAME))
    with OutputLock.acquire(root, "third"):
        assert os.path.exists(os.path.join(root, LOCK_NAME))
    assert not os.path.exists(os.path.join(root, LOCK_NAME))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    root = str(tmp_path / "out")
    write_lock(root, pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="paircurate.lock"):
        lock = OutputLock.acquire(root, "new")
    assert "took over the stale lock" in caplog.text
    assert json.load(open(os.path.join(root, LOCK_NAME)))["command"] == "new"
    lock.release()
    assert os.listdir(root) == []  # nothing left aside


def test_lock_of_another_host_or_a_live_process_is_not_taken_over(tmp_path):
    assert not is_stale(lock_info("x"))  # this very process
    assert not is_stale(dict(lock_info("x"), host="elsewhere.example", pid=dead_pid()))
    assert is_stale(dict(lock_info("x"), pid=dead_pid()))
    assert is_stale(dict(lock_info("x"), pid_start="1"))  # our pid, an earlier process: the pid was reused
    root = str(tmp_path / "out")
    write_lock(root, host="elsewhere.example", pid=dead_pid())
    with pytest.raises(LockError, match="elsewhere.example"):
        OutputLock.acquire(root)
    with open(os.path.join(root, LOCK_NAME), "w") as handle:
        handle.write("{not json")
    with pytest.raises(LockError, match="cannot be read"):
        OutputLock.acquire(root)


def test_release_never_removes_another_runs_lock(tmp_path):
    root = str(tmp_path / "out")
    lock = OutputLock.acquire(root, "mine")
    other = write_lock(root, command="theirs")  # e.g. the user deleted ours and started another run
    lock.release()
    assert json.load(open(os.path.join(root, LOCK_NAME)))["token"] == other["token"]


class _HeldHandler(BaseHTTPRequestHandler):
    """Serves one JPEG, but only once the test lets it go."""
    entered = threading.Event()
    release = threading.Event()
    body = b""

    def do_GET(self):  # noqa: N802
        type(self).entered.set()
        type(self).release.wait(120)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, parquet_input):
    _HeldHandler.body = encode(synthetic_image(4300, size=(64, 64))[0])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeldHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host_port = f"127.0.0.1:{server.server_address[1]}"
    path = parquet_input([{"url": f"http://{host_port}/held.jpg", "caption": "a held picture"}],
                         "held.parquet")
    config = load_config(overrides=[f"fetch.allowed_hosts=[{host_port}]", "fetch.retries=0",
                                    "dedup.enabled=false", "clip.enabled=false", "output.report=false"])
    out = str(tmp_path / "out")
    outcome = {}

    def first():
        try:
            outcome["stats"] = run_pipeline(path, out, config)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert _HeldHandler.entered.wait(120), outcome.get("error")
        with pytest.raises(RunError, match="in use by another paircurate run"):
            run_pipeline(path, out, config)
        result = CliRunner().invoke(cli, ["run", "--input", path, "--output", out, "--no-clip",
                                          "--allow-host", host_port])
        assert result.exit_code == 1 and "in use by another paircurate run" in result.output
        assert "Traceback" not in result.output
    finally:
        _HeldHandler.release.set()
        thread.join(120)
        server.shutdown()
        server.server_close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["stats"]["by_status"]["ok"] == 1 and outcome["stats"]["ledger_rows"] == 1
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


def test_run_takes_over_a_stale_lock_and_releases_on_failure(tmp_path, image_server, parquet_input,
                                                             monkeypatch):
    path = small_input(image_server, parquet_input)
    out = str(tmp_path / "out")
    write_lock(out, pid=dead_pid())
    stats = run_pipeline(path, out, config_for(image_server))
    assert stats["by_status"]["ok"] == 4 and not os.path.exists(os.path.join(out, LOCK_NAME))

    def broken(*args, **kwargs):
        raise RuntimeError("the pipeline broke")

    monkeypatch.setattr(run_module, "finalise", broken)
    with pytest.raises(RuntimeError, match="broke"):
        run_pipeline(path, str(tmp_path / "other"), config_for(image_server))
    assert not os.path.exists(os.path.join(tmp_path, "other", LOCK_NAME))


def test_score_takes_the_lock(tmp_path):
    from paircurate.score import run_score

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"")
    out = str(tmp_path / "out")
    config = load_config(None, ["clip.model_config=paircurate-tiny", "clip.pretrained=none",
                                "clip.device=cpu", "output.report=false"])
    with OutputLock.acquire(out, "paircurate run --output out"):
        with pytest.raises(RunError, match="in use by another paircurate run"):
            run_score(str(tmp_path / "in" / "*.tar"), out, config)
        assert os.listdir(out) == [LOCK_NAME]  # nothing prepared, nothing cleared


# --- what may be cleared -----------------------------------------------------------------------


@pytest.mark.parametrize("foreign", ["metadata", "shards", "embeddings", "stats.json"])
def test_folder_paircurate_did_not_write_is_never_cleared(tmp_path, image_server, parquet_input, foreign):
    path = small_input(image_server, parquet_input)
    out = tmp_path / "out"
    target = out / foreign
    if "." in foreign:
        out.mkdir()
        target.write_text("{\"mine\": true}")
    else:
        target.mkdir(parents=True)
        (target / "precious.parquet").write_bytes(b"the user's own data")
    with pytest.raises(RunError, match=f"holds {foreign}, which paircurate did not write"):
        run_pipeline(str(path), str(out), config_for(image_server))
    assert target.exists() and not (out / RUN_MARKER).exists()
    result = CliRunner().invoke(cli, ["run", "--input", path, "--output", str(out), "--no-clip",
                                      "--allow-host", image_server.host_port])
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    assert target.exists()
    stats = run_pipeline(str(path), str(out), config_for(image_server), overwrite=True)
    assert stats["by_status"]["ok"] == 4
    if foreign != "stats.json":
        assert not (target / "precious.parquet").exists()


def test_empty_missing_and_unrelated_folders_are_fine(tmp_path, image_server, parquet_input):
    path = small_input(image_server, parquet_input)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not a run output: left alone")
    for name in ("empty", "missing/deeper", "notes"):
        stats = run_pipeline(path, str(tmp_path / name), config_for(image_server))
        assert stats["by_status"]["ok"] == 4
        marker = json.load(open(tmp_path / name / RUN_MARKER))
        assert marker["started"] and marker["pid"] == os.getpid()
    assert (tmp_path / "notes" / "README.txt").exists()


def test_unfinished_paircurate_run_is_cleared_but_resumable_work_survives(tmp_path, image_server,
                                                                           parquet_input, monkeypatch):
    monkeypatch.setattr(run_module, "RESUMABLE", ("_staging",))
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "00042.tar").write_bytes(b"half-written")
    (out / "_staging").mkdir()
    (out / "_staging" / "done.json").write_text("{}")
    (out / RUN_MARKER).write_text("{}")
    prepare_output(str(out), overwrite=False)
    assert not (out / "shards").exists() and (out / "_staging" / "done.json").exists()
    prepare_output(str(out), overwrite=True)  # --overwrite deletes resumable work too
    assert not (out / "_staging").exists() and (out / RUN_MARKER).exists()


def test_nightly_restarts_a_run_that_failed_half_way(tmp_path, image_server, parquet_input, monkeypatch):
    path = small_input(image_server, parquet_input)
    root = str(tmp_path / "dataset")
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("killed half-way")

    real_finalise = run_module.finalise
    monkeypatch.setattr(run_module, "finalise", fail_once)
    with pytest.raises(RuntimeError):
        run_nightly(path, root, "2026-11-24", config_for(image_server))
    target = os.path.join(root, "runs", "2026-11-24")
    assert os.path.exists(os.path.join(target, RUN_MARKER)) and os.listdir(os.path.join(target, "shards"))
    monkeypatch.setattr(run_module, "finalise", real_finalise)
    stats = run_nightly(path, root, "2026-11-24", config_for(image_server))
    assert stats["ledger_rows"] == 4 and os.path.exists(os.path.join(target, "_SUCCESS"))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


# --- replacing a finished run --------------------------------------------------------------------


def test_kill_while_overwrite_clears_never_leaves_a_finished_run_without_shards(tmp_path, image_server,
                                                                              parquet_input, monkeypatch):
    path = small_input(image_server, parquet_input)
    out = str(tmp_path / "out")
    run_pipeline(path, out, config_for(image_server))
    real_delete = FileSystems.delete

    def killed_after_first(paths):
        real_delete(paths[:1])  # the first path goes, then the process "dies"
        raise Killed()

    monkeypatch.setattr(FileSystems, "delete", staticmethod(killed_after_first))
    with pytest.raises(Killed):
        prepare_output(out, overwrite=True)
    monkeypatch.setattr(FileSystems, "delete", staticmethod(real_delete))
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))  # not "finished" with parts gone
    assert os.path.exists(os.path.join(out, RUN_MARKER))
    stats = run_pipeline(path, out, config_for(image_server))  # an unfinished run: cleared, no --overwrite
    assert stats["by_status"]["ok"] == 4 and os.path.exists(os.path.join(out, "_SUCCESS"))


def test_overwrite_that_fails_has_already_deleted_the_old_run(tmp_path, image_server, parquet_input,
                                                              monkeypatch):
    """README: --overwrite deletes the finished run first; a failure leaves an unfinished run."""
    path = small_input(image_server, parquet_input)
    out = str(tmp_path / "out")
    run_pipeline(path, out, config_for(image_server))

    def broken(*args, **kwargs):
        raise RuntimeError("the pipeline broke")

    monkeypatch.setattr(run_module, "build", broken)
    with pytest.raises(RuntimeError, match="broke"):
        run_pipeline(path, out, config_for(image_server), overwrite=True)
    left = sorted(os.listdir(out))
    assert left == [RUN_MARKER], left  # the old shards, ledger and _SUCCESS are gone; no lock left
