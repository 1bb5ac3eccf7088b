"""What progress reporting costs: one tally increment, and a whole local run with and without it.

1. ns per ``Tally.add`` (the only per-row work: a lock and a dictionary
   increment; files are written on a timer, never per row), single thread.
2. A local run (in-process FnApiRunner) of N distinct images (the demo's
   generator) from a loopback server, CLIP off, dedup on: with progress (as
   `paircurate run`) and without (the tally replaced by None, so no step counts
   and no worker file is written), alternating rounds after one warm-up
   run; prints the job's wall time and CPU time per round and the medians.  Not part of the tests.

    .venv/bin/python benchmarks/progress_overhead.py --n 2000 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_add_ns(calls: int = 1_000_000) -> float:
    from paircurate.progress import Tally

    with tempfile.TemporaryDirectory() as folder:
        counter = Tally(folder, flush_seconds=3600)
        keys = ["fetch/ok", "resize/ok", "ledger/ok", "fetch/http_404"]
        started = time.perf_counter()
        for i in range(calls):
            counter.add(keys[i & 3])
        elapsed = time.perf_counter() - started
        counter.close()
    return 1e9 * elapsed / calls


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(input_path: str, output: str, host_port: str, with_progress: bool) -> tuple:
    import paircurate.progress as progress
    from paircurate.config import load_config
    from paircurate.run import run_pipeline

    original = progress.tally
    if not with_progress:
        progress.tally = lambda folder: None  # every step looks it up in setup: nothing counted
    try:
        config = load_config(overrides=[f"fetch.allowed_hosts=[{host_port}]", "clip.enabled=false",
                                        "output.report=false"])
        started, cpu = time.perf_counter(), cpu_seconds()
        run_pipeline(input_path, output, config, overwrite=True)
        return time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        progress.tally = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="input rows (distinct images)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from spark_vs_local import serve_sample

    from paircurate.imageserver import ImageServer

    print(f"Tally.add: {per_add_ns():.0f} ns per call")
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    with tempfile.TemporaryDirectory() as work, ImageServer() as server:
        rows = serve_sample(server, args.n)
        input_path = os.path.join(work, "input.parquet")
        pq.write_table(pa.Table.from_pylist(rows), input_path)
        one_run(input_path, os.path.join(work, "out"), server.host_port, True)  # warm-up, not counted
        for round_ in range(args.rounds):
            for with_progress in ((True, False) if round_ % 2 == 0 else (False, True)):
                seconds, used = one_run(input_path, os.path.join(work, "out"), server.host_port, with_progress)
                times[with_progress].append(seconds)
                cpu[with_progress].append(used)
                print(f"round {round_ + 1}, progress {'on ' if with_progress else 'off'}: {seconds:.1f} s "
                      f"({args.n / seconds:.1f} rows/s), CPU {used:.1f} s", flush=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"median wall: progress on {on:.1f} s, off {off:.1f} s, difference {100 * (on - off) / off:+.1f}%")
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"median CPU (this process: runner, workers' threads, the image server): progress on {on:.1f} s, "
          f"off {off:.1f} s, difference {100 * (on - off) / off:+.1f}%")


if __name__ == "__main__":
    main()
