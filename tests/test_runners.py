"""Runner-agnostic behaviour: multi-process local runs, portable graph, PortableRunner and Spark runs,
Dataflow dry run, nightly."""
import glob
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import build_sample, demo_checkpoint, demo_overrides, encode, synthetic_image, write_input
from paircurate.graph import OutputLayout, build, plan_input
from paircurate.imageserver import Route
from paircurate.run import RUN_MARKER, earlier_runs, run_nightly, run_pipeline
from paircurate.transforms.beam_util import make_pipeline

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import build_rows, config_for, read_ledger  # noqa: E402


def shard_bytes(root):
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(root, "shards", "*.tar")))}


def comparable(ledger):
    return sorted((tuple(sorted(r.items())) for r in ledger), key=repr)


def test_multi_process_run_equals_in_process_run(tmp_path, image_server, parquet_input):
    rows = build_rows(image_server)
    path = parquet_input(rows, row_group_size=3)
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    run_pipeline(path, single, config_for(image_server))
    stats = run_pipeline(path, multi, config_for(image_server, "runner.direct_running_mode=multi_processing",
                                                 "runner.direct_num_workers=2"))
    assert stats["config"]["runner"]["direct_running_mode"] == "multi_processing"
    assert comparable(read_ledger(single)) == comparable(read_ledger(multi))
    assert shard_bytes(single) == shard_bytes(multi) and shard_bytes(single)


def test_pipeline_round_trips_through_runner_api(tmp_path, image_server, parquet_input):
    import apache_beam as beam

    path = parquet_input(build_rows(image_server))
    config = config_for(image_server)
    pipeline = make_pipeline("DirectRunner")
    build(pipeline, plan_input(path, config), config, OutputLayout(str(tmp_path / "o")))
    proto = pipeline.to_runner_api()
    again = beam.Pipeline.from_runner_api(proto, pipeline.runner, pipeline._options)
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"Read", "Validate", "Fetch", "Decode", "Shards", "Ledger"} <= names
    assert len(again.to_runner_api().components.transforms) == len(proto.components.transforms)


def test_dataflow_dry_run_builds_gpu_job_offline(tmp_path, image_server, parquet_input):
    pytest.importorskip("apitools", reason="the gcp extra (apache-beam[gcp]) is not installed")
    path = parquet_input(build_rows(image_server))
    config = load_config("dataflow", ["clip.enabled=false", "dedup.enabled=false"])
    result = run_pipeline(path, str(tmp_path / "out"), config,
                          ["--no_auth", "--dry_run=True", "--project=test-project"])
    assert result["dry_run"] is True
    job = result["job"]
    environments = job.proto_pipeline.components.environments.values()
    images = set()
    for env in environments:
        from apache_beam.portability.api import beam_runner_api_pb2
        payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload)
        images.add(payload.container_image)
    assert images == {config.runner.options["sdk_container_image"]}
    options = job.options.get_all_options()
    assert "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" in options["dataflow_service_options"]
    assert "use_runner_v2" in options["experiments"]
    assert not os.path.exists(tmp_path / "out")  # nothing written by a dry run


def test_dataflow_dry_run_from_the_cli(tmp_path, image_server, parquet_input):
    pytest.importorskip("apitools", reason="the gcp extra (apache-beam[gcp]) is not installed")
    path = parquet_input(build_rows(image_server))
    result = CliRunner().invoke(cli, ["run", "--config", "dataflow", "--input", path, "--output",
                                      "gs://bucket/out", "--no-clip", "--set", "dedup.enabled=false",
                                      "--", "--no_auth", "--dry_run=True"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output


# --- portable runners: the whole pipeline through a job service, compared with the local run ----------


def portable_sample(server, tmp_path):
    """The demo's input (367 rows, every status: duplicates of all kinds, bad URLs, bad files,
    mismatched captions)."""
    rows = build_sample(server, n_images=240, seed=3)
    path = str(tmp_path / "input.parquet")
    write_input(rows, path)
    return rows, path


def portable_config(server):
    # Dedup on, the demo's CLIP and filter on CPU; one pair per model call, so that no score
    # depends on how a runner cuts its bundles (and the shards' .json can be byte-compared).
    return load_config(overrides=demo_overrides(server.host_port, demo_checkpoint())
                       + ["clip.batch_size=1", "clip.preprocess_threads=1", "output.samples_per_shard=40"])


def assert_same_run(reference, other, rows):
    """Same ledger (every column of every row) and byte-identical shards as the reference run."""
    ledger = read_ledger(other)
    assert len(ledger) == len(rows)
    assert comparable(ledger) == comparable(read_ledger(reference))
    statuses = {r["status"] for r in ledger}
    assert {"ok", "duplicate_exact", "duplicate_near", "duplicate_input", "fetch_failed"} <= statuses
    assert all(r["clip_score"] is not None for r in ledger if r["status"] == "ok")
    assert shard_bytes(other) == shard_bytes(reference) and shard_bytes(reference)
    assert os.path.exists(os.path.join(other, "_SUCCESS"))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, limit_s=60.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the job service exited with {process.returncode} before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the job service did not listen on 127.0.0.1:{port} within {limit_s:.0f} s")


@pytest.fixture
def python_job_service(tmp_path):
    """Beam's own Python job service on loopback; stopped at the end whatever happens."""
    port = free_port()
    log = open(tmp_path / "job_service.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                                f"--port={port}", f"--staging_dir={tmp_path / 'job_staging'}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def test_portable_runner_equals_in_process_run(tmp_path, image_server, python_job_service):
    rows, path = portable_sample(image_server, tmp_path)
    local, portable = str(tmp_path / "local"), str(tmp_path / "portable")
    run_pipeline(path, local, portable_config(image_server))
    config = portable_config(image_server)
    config.runner.runner = "PortableRunner"
    stats = run_pipeline(path, portable, config,
                         [f"--job_endpoint={python_job_service}", "--environment_type=LOOPBACK"])
    assert stats["ledger_rows"] == len(rows)
    assert_same_run(local, portable, rows)


SPARK_CLUSTER_VARS = ("PAIRCURATE_SPARK_JOB_ENDPOINT", "PAIRCURATE_SPARK_MASTER_URL", "PAIRCURATE_SPARK_WORKER_POOL")


@pytest.fixture
def spark_cluster():
    """The loopback Spark cluster deploy/spark/cluster.sh started (.ci/run starts it).

    In CI (CI=true) a missing cluster fails the test: it must run there.
    """
    missing = [name for name in SPARK_CLUSTER_VARS if not os.environ.get(name)]
    if missing:
        message = ("no Spark cluster: start one with `deploy/spark/cluster.sh start` and "
                   "`source /tmp/paircurate-spark/cluster.env` (stop it with `deploy/spark/cluster.sh stop`); "
                   f"unset: {', '.join(missing)}")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return {name: os.environ[name] for name in SPARK_CLUSTER_VARS}


def test_spark_runner_equals_in_process_run(tmp_path, image_server, spark_cluster):
    rows, path = portable_sample(image_server, tmp_path)
    local, on_spark = str(tmp_path / "local"), str(tmp_path / "spark")
    run_pipeline(path, local, portable_config(image_server))
    config = portable_config(image_server)
    spark_yaml = load_config("spark")
    config.runner = spark_yaml.runner
    config.runner.options.update(job_endpoint=spark_cluster["PAIRCURATE_SPARK_JOB_ENDPOINT"],
                                 spark_master_url=spark_cluster["PAIRCURATE_SPARK_MASTER_URL"],
                                 environment_config=spark_cluster["PAIRCURATE_SPARK_WORKER_POOL"])
    stats = run_pipeline(path, on_spark, config)
    assert stats["config"]["runner"]["runner"] == "SparkRunner"
    assert stats["ledger_rows"] == len(rows)
    assert_same_run(local, on_spark, rows)


def test_nightly_runs_add_only_new_images(tmp_path, image_server, parquet_input):
    """Two nightly runs with overlapping input: the second writes only new images."""
    images = []
    for i in range(10):
        image, caption = synthetic_image(9100 + i)
        image_server.routes[f"/n/{i}.jpg"] = Route(encode(image))
        images.append({"url": image_server.url(f"/n/{i}.jpg"), "caption": caption})
    # Day two re-lists images 4..7 under new URLs (re-hosted copies) and adds 8..9.
    for i in range(4, 8):
        image_server.routes[f"/rehost/{i}.jpg"] = image_server.routes[f"/n/{i}.jpg"]
    day1 = parquet_input(images[:8], "day1.parquet")
    day2 = parquet_input([{"url": image_server.url(f"/rehost/{i}.jpg"), "caption": images[i]["caption"]}
                          for i in range(4, 8)] + images[8:], "day2.parquet")
    root = str(tmp_path / "dataset")
    overrides = [f"fetch.allowed_hosts=[{image_server.host_port}]", "clip.enabled=false",
                 "output.samples_per_shard=4"]
    first = run_nightly(day1, root, "2026-11-25", load_config("nightly", overrides))
    assert first["by_status"]["ok"] == 8
    second = run_nightly(day2, root, "2026-11-26", load_config("nightly", overrides))
    assert second["ledger_rows"] == 6
    assert second["by_status"]["ok"] == 2
    assert second["by_status"]["duplicate_exact"] + second["by_status"]["duplicate_near"] == 4
    ledger2 = read_ledger(os.path.join(root, "runs", "2026-11-26"))
    kept_day1 = {r["uid"] for r in read_ledger(os.path.join(root, "runs", "2026-11-25")) if r["status"] == "ok"}
    assert len(ledger2) == 6
    assert {r["duplicate_of"] for r in ledger2 if r["status"].startswith("duplicate")} <= kept_day1
    assert earlier_runs(root, "2026-11-27") == [os.path.join(root, "runs", d) for d in ("2026-11-25", "2026-11-26")]
    # Rerunning a finished run id changes nothing.
    before = shard_bytes(os.path.join(root, "runs", "2026-11-25"))
    assert run_nightly(day1, root, "2026-11-25", load_config("nightly", overrides)) is None
    assert shard_bytes(os.path.join(root, "runs", "2026-11-25")) == before
    result = CliRunner().invoke(cli, ["run", "--config", "nightly", "--input", day1, "--output", root,
                                      "--run-id", "2026-11-25", "--no-clip"])
    assert result.exit_code == 0 and "already succeeded" in result.output


def test_nightly_restarts_a_failed_run_cleanly(tmp_path, image_server, parquet_input):
    rows = build_rows(image_server)
    path = parquet_input(rows)
    root = str(tmp_path / "dataset")
    target = os.path.join(root, "runs", "2026-11-24")
    os.makedirs(os.path.join(target, "shards"))
    open(os.path.join(target, RUN_MARKER), "w").write("{}")  # paircurate started a run here
    stale = os.path.join(target, "shards", "00042.tar")
    open(stale, "wb").write(b"half-written")
    stats = run_nightly(path, root, "2026-11-24", config_for(image_server))
    assert not os.path.exists(stale)
    assert stats["ledger_rows"] == len(rows)


def test_airflow_dag_imports():
    pytest.importorskip("airflow", reason="Airflow is not installed (.ci/run checks the DAG in its own venv)")
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "deploy", "airflow", "check_dag.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
