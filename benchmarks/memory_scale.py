"""Peak memory of a local run as the input list grows, and its shuffle volume per row.

    HF_HUB_OFFLINE=1 python benchmarks/memory_scale.py --rows 5000 50000

For each size: a Parquet list of distinct generated JPEGs (captions of 100-200
characters), served from a loopback server in its own process (images made
on request, so the server holds none), and `paircurate run --no-clip` (the
issue's settings: image.image_size=512, resize_mode=keep_ratio) as a child
process.  The peak resident memory of that process and all its descendants
is sampled every 0.2 s from /proc.  Prints rows, seconds, peak MiB, the
peak's ratio to the first size's, and stats.json's shuffle_bytes_per_row.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("a photo of the red old small large blue green house dog cat tree car street river "
         "mountain beach city night morning people child woman man bicycle bridge boat window "
         "garden kitchen table chair flower sky cloud sunset road train station market").split()


def generated_jpeg(index: int, width: int = 640, height: int = 480) -> bytes:
    """A distinct image per index: a gradient with coloured boxes placed by a seeded generator."""
    from PIL import Image, ImageDraw

    rng = random.Random(index)
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.rectangle([x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)],
                       fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def caption(index: int) -> str:
    rng = random.Random(-index - 1)
    words: List[str] = []
    target = rng.randrange(100, 201)
    while len(" ".join(words)) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:target]


class GeneratedRoutes(dict):
    """Routes made on request: /img/N.jpg is image N."""

    def __init__(self, size=(640, 480)):
        super().__init__()
        self._size = size

    def get(self, path, default=None):
        from paircurate.imageserver import Route

        if path.startswith("/img/") and path.endswith(".jpg"):
            return Route(generated_jpeg(int(path[5:-4]), *self._size))
        return default


def serve(port_queue, stop_event, size=(640, 480)) -> None:
    from paircurate.imageserver import ImageServer

    with ImageServer() as server:
        server.use_routes(GeneratedRoutes(size))  # images made on request
        port_queue.put(server.host_port)
        stop_event.wait()


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    total, stack, seen = 0, [root_pid], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    stack.extend(int(p) for p in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_once(rows: int, host_port: str, workdir: str, extra: List[str]) -> Dict[str, Optional[float]]:
    table = pa.table({"url": [f"http://{host_port}/img/{i}.jpg" for i in range(rows)],
                      "caption": [caption(i) for i in range(rows)]})
    input_path = os.path.join(workdir, f"input-{rows}.parquet")
    pq.write_table(table, input_path, row_group_size=10000)
    out = os.path.join(workdir, f"out-{rows}")
    command = [sys.executable, "-m", "paircurate.cli", "run", "--input", input_path, "--output", out,
               "--no-clip", "--allow-host", host_port, "--set", "image.image_size=512",
               "--set", "image.resize_mode=keep_ratio", "--set", "output.report=false", *extra]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(0.2)
    seconds = time.time() - started
    if process.returncode != 0 or not os.path.exists(os.path.join(out, "stats.json")):
        raise SystemExit(f"run of {rows} rows failed:\n{process.stderr.read().decode()[-3000:]}")
    with open(os.path.join(out, "stats.json")) as handle:
        stats = json.load(handle)
    if stats["kept"] < rows * 0.99:  # a broken server or network would measure nothing
        raise SystemExit(f"only {stats['kept']} of {rows} rows were kept: {stats['by_status']}")
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "seconds": seconds, "peak_mib": peak / 2**20,
            "kept": stats["kept"], "shuffle_bytes_per_row": stats.get("shuffle_bytes_per_row"),
            "shuffle_bytes_per_row_by_step": {
                step: round(n / rows, 1)
                for step, n in sorted((stats.get("shuffle_bytes_by_step") or {}).items(),
                                      key=lambda kv: -kv[1])[:8]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra --set SECTION.KEY=VALUE for every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    extra = [x for s in args.sets for x in ("--set", s)]
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(ports, stop), daemon=True)
    server.start()
    host_port = ports.get(timeout=60)
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-scale-") as workdir:
        try:
            for rows in args.rows:
                result = run_once(rows, host_port, workdir, extra)
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            stop.set()
            server.join(timeout=10)
    base = results[0]["peak_mib"]
    print(f"\n{'rows':>8} {'seconds':>8} {'peak MiB':>9} {'x first':>8} {'kept':>7} {'shuffle B/row':>14}")
    for r in results:
        print(f"{r['rows']:>8} {r['seconds']:>8.1f} {r['peak_mib']:>9.0f} {r['peak_mib'] / base:>8.2f} "
              f"{r['kept']:>7} {r['shuffle_bytes_per_row'] if r['shuffle_bytes_per_row'] is not None else '-':>14}")


if __name__ == "__main__":
    main()
