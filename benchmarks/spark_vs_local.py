"""Rows/s of one input on the local runner and on a Spark standalone cluster, same machine.

Generates N distinct images (the demo's generator, 200-640 px JPEGs), serves
them from a loopback server in this process, and runs `paircurate run` in a
subprocess on each runner with CLIP off (dedup on, the default config
otherwise): first the local runner, then SparkRunner through the cluster
that deploy/spark/cluster.sh started (source its cluster.env first).  Prints,
per runner, the wall time of the command, the pipeline's own rows/s from
stats.json and the number kept, then whether both runs gave the same ledger
and the same shard bytes.  Not part of the tests.

    deploy/spark/cluster.sh start && source /tmp/paircurate-spark/cluster.env
    .venv/bin/python benchmarks/spark_vs_local.py --n 2000
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

PAIRCURATE = os.path.join(os.path.dirname(sys.executable), "paircurate")


def serve_sample(server, n: int):
    from paircurate.demo import encode, synthetic_image
    from paircurate.imageserver import Route

    rows = []
    for i in range(n):
        image, caption = synthetic_image(500000 + i)
        server.routes[f"/b/{i}.jpg"] = Route(encode(image))
        rows.append({"url": server.url(f"/b/{i}.jpg"), "caption": f"{caption} number {i}"})
    return rows


def run(name: str, input_path: str, output: str, host_port: str, extra) -> dict:
    command = [PAIRCURATE, "run", "--input", input_path, "--output", output, "--no-clip",
               "--set", f"fetch.allowed_hosts=[{host_port}]", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    with open(os.path.join(output, "stats.json")) as handle:
        stats = json.load(handle)
    return {"runner": name, "rows": stats["ledger_rows"], "kept": stats["kept"], "wall_s": round(wall, 1),
            "rows_per_s_wall": round(stats["ledger_rows"] / wall, 1), "rows_per_s_job": stats["rows_per_s"]}


def ledger(root: str):
    import pyarrow.parquet as pq

    rows = [r for f in sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
            for r in pq.read_table(f).to_pylist()]
    return sorted(repr(sorted(r.items())) for r in rows)


def shards(root: str):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(root, "shards", "*.tar")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="input rows (distinct images)")
    args = parser.parse_args()
    missing = [v for v in ("PAIRCURATE_SPARK_JOB_ENDPOINT", "PAIRCURATE_SPARK_WORKER_POOL") if not os.environ.get(v)]
    if missing:
        sys.exit("start the cluster first: deploy/spark/cluster.sh start && "
                 "source /tmp/paircurate-spark/cluster.env")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paircurate.imageserver import ImageServer

    with tempfile.TemporaryDirectory() as work, ImageServer() as server:
        rows = serve_sample(server, args.n)
        input_path = os.path.join(work, "input.parquet")
        pq.write_table(pa.Table.from_pylist(rows), input_path, row_group_size=250)
        local = run("local (FnApiRunner, in process)", input_path, os.path.join(work, "local"),
                    server.host_port, [])
        spark = run("Spark standalone (1 worker)", input_path, os.path.join(work, "spark"), server.host_port,
                    ["--config", "spark", "--",
                     f"--job_endpoint={os.environ['PAIRCURATE_SPARK_JOB_ENDPOINT']}",
                     f"--environment_config={os.environ['PAIRCURATE_SPARK_WORKER_POOL']}",
                     f"--spark_master_url={os.environ.get('PAIRCURATE_SPARK_MASTER_URL', '')}"])
        for result in (local, spark):
            print(json.dumps(result))
        same_ledger = ledger(os.path.join(work, "local")) == ledger(os.path.join(work, "spark"))
        same_shards = shards(os.path.join(work, "local")) == shards(os.path.join(work, "spark"))
        print(json.dumps({"rows": args.n, "spark_rows_per_s_over_local": round(local["wall_s"] / spark["wall_s"], 2),
                          "same_ledger": same_ledger, "same_shard_bytes": same_shards,
                          "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
