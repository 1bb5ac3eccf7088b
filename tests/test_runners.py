"""Runner-agnostic behaviour: multi-process local runs, portable graph, Dataflow dry run, Spark, nightly."""
import glob
import os
import shutil
import sys

import pytest
from click.testing import CliRunner

from paircurate.beam_util import make_pipeline
from paircurate.cli import cli
from paircurate.config import load_config
from paircurate.demo import encode, synthetic_image
from paircurate.graph import OutputLayout, build, plan_input
from paircurate.imageserver import Route
from paircurate.run import RUN_MARKER, earlier_runs, run_nightly, run_pipeline

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


@pytest.mark.skipif(not (shutil.which("java") and os.environ.get("PAIRCURATE_SPARK_JOB_SERVER_JAR")),
                    reason="needs Java and a Beam Spark job server jar (PAIRCURATE_SPARK_JOB_SERVER_JAR); "
                           "Maven Central is not reachable here")
def test_spark_runner_end_to_end(tmp_path, image_server, parquet_input):
    rows = build_rows(image_server)
    path = parquet_input(rows)
    config = config_for(image_server, "runner.runner=SparkRunner")
    config.runner.options = {"spark_job_server_jar": os.environ["PAIRCURATE_SPARK_JOB_SERVER_JAR"],
                             "spark_master_url": "local[2]", "environment_type": "LOOPBACK"}
    stats = run_pipeline(path, str(tmp_path / "out"), config)
    assert stats["ledger_rows"] == len(rows)


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
