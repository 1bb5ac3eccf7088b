"""What the local runner holds per row: resident memory after each stage, and the tables waiting.

    HF_HUB_OFFLINE=1 python benchmarks/runner_tables.py --rows 4000

Runs `paircurate run --no-clip` in this process (memory_scale.py's input and
loopback server) and, after each stage the FnApiRunner executes, prints the
process's resident memory (and its peak during the stage: VmHWM, reset
before each), Python's allocated blocks, and every buffer that
waits for a consuming stage: encoded lists (their bytes) and grouping tables
(keys, values, and an estimate of their decoded size from a sample of 200).
It reads the FnApiRunner's private structures (Beam 2.77): a measuring tool,
not part of the pipeline.  --image-size 160x120 makes the fetch stage quicker
(the tables and the stages after it do not depend on the images' size);
--trace adds tracemalloc's figures (slow: minutes for a few thousand rows).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_scale  # noqa: E402  (the same input and server)


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its peak since the last reset_peak() (VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """Start VmHWM again from the current resident memory (Linux 4.0+: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: the peak is then the process's
        pass


def deep_size(value, seen=None, depth=0) -> int:
    seen = seen if seen is not None else set()
    if id(value) in seen or depth > 6:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k, seen, depth + 1) + deep_size(v, seen, depth + 1) for k, v in value.items())
    elif isinstance(value, (list, tuple, set)):
        size += sum(deep_size(x, seen, depth + 1) for x in value)
    return size


def describe(buffer) -> str:
    from apache_beam.runners.portability.fn_api_runner.execution import GroupingBuffer, ListBuffer

    if isinstance(buffer, ListBuffer):
        n = sum(len(c) for c in buffer._inputs) + sum(len(c) for g in (buffer._grouped_output or []) for c in g)
        return f"encoded list {n / 2**20:.2f} MiB" if n else None
    if isinstance(buffer, GroupingBuffer):
        if buffer._grouped_output:
            n = sum(len(c) for g in buffer._grouped_output for c in g)
            return f"grouped, encoded {n / 2**20:.2f} MiB"
        values = sum(len(v) for v in buffer._table.values())
        sample = list(buffer._table.items())[:200]
        per_value = (sum(deep_size(k) + deep_size(v) + 100 for k, v in sample)  # + dict slot, list
                     / max(1, sum(len(v) for _, v in sample)))
        return (f"grouping table: {len(buffer._table)} keys, {values} values, about {per_value:.0f} B "
                f"a value, {per_value * values / 2**20:.2f} MiB")
    return type(buffer).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc: Python's traced memory per stage, and where the stages that "
                             "grow it allocated (slow)")
    parser.add_argument("--image-size", default="640x480",
                        help="WIDTHxHEIGHT of the generated images (smaller: a quicker fetch stage)")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    size = tuple(int(n) for n in args.image_size.split("x"))
    server = ctx.Process(target=memory_scale.serve, args=(ports, stop, size), daemon=True)
    server.start()
    host_port = ports.get(timeout=60)
    workdir = tempfile.mkdtemp(prefix="runner-tables-")
    table = pa.table({"url": [f"http://{host_port}/img/{i}.jpg" for i in range(args.rows)],
                      "caption": [memory_scale.caption(i) for i in range(args.rows)]})
    input_path = os.path.join(workdir, "input.parquet")
    pq.write_table(table, input_path, row_group_size=10000)

    from apache_beam.runners.portability.fn_api_runner import fn_runner

    execute = fn_runner.FnApiRunner._execute_bundle
    started = time.time()
    if args.trace:
        import tracemalloc
        tracemalloc.start(8)
        last = [tracemalloc.take_snapshot(), 0]  # the last snapshot, and the traced memory then

    def logged(self, context, bundle_context, bundle_input):
        before = rss_mib()
        reset_peak()
        result = execute(self, context, bundle_context, bundle_input)
        print(f"[{time.time() - started:6.0f}s] RSS {before:6.0f} -> {rss_mib():6.0f} MiB "
              f"(peak {rss_mib('VmHWM'):6.0f}), "
              f"{sys.getallocatedblocks() / 1e6:.2f}M blocks: {bundle_context.stage.name[:100]}", flush=True)
        if args.trace:
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            print(f"      traced {current / 2**20:.1f} MiB (peak in the stage {peak / 2**20:.1f})", flush=True)
            if abs(current - last[1]) > 3 * 2**20:
                snapshot = tracemalloc.take_snapshot()
                for stat in snapshot.compare_to(last[0], "traceback")[:8]:
                    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stat.traceback[:5])
                    print(f"        {stat.size_diff / 2**20:+7.2f} MiB {stat.count_diff:+8d} blocks: {where}")
                last[:] = [snapshot, current]
        for (stage, _), data_input in list(context.queues.watermark_pending_inputs._q):
            for buffer in data_input.data.values():
                description = describe(buffer)
                if description:  # empty lists (impulses, side outputs nothing went to) are left out
                    print(f"      waiting for {stage[:60]}: {description}", flush=True)
        return result

    fn_runner.FnApiRunner._execute_bundle = logged
    from paircurate import cli

    try:
        cli.main(["run", "--input", input_path, "--output", os.path.join(workdir, "out"), "--no-clip",
                  "--allow-host", host_port, "--set", "image.image_size=512",
                  "--set", "image.resize_mode=keep_ratio", "--set", "output.report=false",
                  *[x for s in args.sets for x in ("--set", s)]])
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        stop.set()
        server.join(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
