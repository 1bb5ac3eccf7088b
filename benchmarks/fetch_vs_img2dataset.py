"""Fetch + resize throughput: paircurate vs img2dataset on the same loopback URL list.

Generates N JPEGs (256-1024 px) into a temp dir, serves them from one
threaded loopback server (in this process), and runs, alternating, in fresh
subprocesses:

* img2dataset.download(...): webdataset output, image_size 256, border,
  jpg quality 95, processes_count=P, thread_count=T;
* paircurate run --input LIST --output DIR with dedup and CLIP off (fetch,
  decode/resize, shards and ledger), fetch.threads=T.

Prints rows/s for each, their ratio and success counts.  Not part of the tests.

    python benchmarks/fetch_vs_img2dataset.py --n 1000 --rounds 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # fault_server


def generate_images(folder: str, n: int, seed: int = 0) -> dict:
    """N distinct JPEGs of 256-1024 px (smooth gradients plus noise: photo-like sizes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 1025, size=2))
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        name = f"{i:06d}.jpg"
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(out.getvalue())
        files[name] = out.getvalue()
    return files


def write_list(path: str, urls) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = [f"benchmark image number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": list(urls), "caption": captions}), path)


def run_img2dataset(url_list: str, out: str, processes: int, threads: int) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    img2dataset.download(
        url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
        output_folder=out, output_format="webdataset", image_size=256, resize_mode="border",
        encode_format="jpg", encode_quality=95, processes_count=processes, thread_count=threads,
        number_sample_per_shard=1000, timeout=10, retries=0, enable_wandb=False,
        incremental_mode="incremental", distributor="multiprocessing")


def stats_img2dataset(out: str):
    """(successes, seconds spent in shards) from img2dataset's per-shard stats."""
    ok, seconds = 0, 0.0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as handle:
                stats = json.load(handle)
            ok += stats.get("successes", 0)
            seconds += stats.get("duration", 0.0)
    return ok, seconds


def stats_paircurate(out: str):
    """(ok rows, pipeline duration) from paircurate's stats.json."""
    with open(os.path.join(out, "stats.json")) as handle:
        stats = json.load(handle)
    return int(stats["by_status"]["ok"]), float(stats["duration_s"])


def timed(cmd, env=None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="img2dataset processes_count")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--profile", action="store_true",
                        help="run paircurate once more under cProfile and print the top functions")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: img2dataset subprocess
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "img2dataset":
        run_img2dataset(args.list, args.out, args.processes, args.threads)
        return

    from fault_server import FaultServer

    work = tempfile.mkdtemp(prefix="fetchbench-")
    try:
        started = time.perf_counter()
        images = os.path.join(work, "images")
        os.makedirs(images)
        files = generate_images(images, args.n)
        size = sum(len(v) for v in files.values())
        print(f"generated {args.n} JPEGs, {size / 1e6:.1f} MB "
              f"(mean {size / args.n / 1e3:.0f} kB) in {time.perf_counter() - started:.1f}s")
        with FaultServer(files=files) as server:
            url_list = os.path.join(work, "urls.parquet")
            write_list(url_list, [server.url(f"/img/{name}") for name in sorted(files)])
            env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
            paircurate = shutil.which("paircurate") or "paircurate"
            results = {"img2dataset": [], "paircurate": []}
            inner_rates = {"img2dataset": [], "paircurate": []}
            successes = {}
            for round_ in range(args.rounds):
                for name in ("img2dataset", "paircurate"):
                    out = os.path.join(work, f"{name}-{round_}")
                    if name == "img2dataset":
                        cmd = [sys.executable, __file__, "--worker", "img2dataset", "--list", url_list,
                               "--out", out, "--processes", str(args.processes),
                               "--threads", str(args.threads)]
                    else:
                        cmd = [paircurate, "run", "--input", url_list, "--output", out,
                               "--set", "dedup.enabled=false", "--set", "clip.enabled=false",
                               "--set", f"fetch.threads={args.threads}",
                               # img2dataset has no per-host cap and every URL here is on one host
                               "--set", f"fetch.per_host_concurrency={args.threads}",
                               "--allow-host", server.host_port]
                    elapsed = timed(cmd, env)
                    ok, inner = (stats_img2dataset if name == "img2dataset" else stats_paircurate)(out)
                    successes[name] = ok
                    results[name].append(args.n / elapsed)
                    inner_rates[name].append(args.n / inner)
                    print(f"round {round_} {name:12s} wall {elapsed:7.2f}s {args.n / elapsed:7.1f} rows/s"
                          f" | in-job {inner:7.2f}s {args.n / inner:7.1f} rows/s | ok={ok}/{args.n}",
                          flush=True)
            if args.profile:
                out = os.path.join(work, "paircurate-profile")
                prof = os.path.join(work, "paircurate.prof")
                code = ("import sys; from paircurate.cli import main; sys.argv=['paircurate']+sys.argv[1:]; "
                        "main()")
                timed([sys.executable, "-m", "cProfile", "-o", prof, "-c", code, "run", "--input",
                       url_list, "--output", out, "--set", "dedup.enabled=false", "--set",
                       "clip.enabled=false", "--set", f"fetch.threads={args.threads}",
                       "--set", f"fetch.per_host_concurrency={args.threads}",
                       "--allow-host", server.host_port], env)
                import pstats
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print(f"\nN={args.n} threads={args.threads} img2dataset processes={args.processes} "
              f"cpus={os.cpu_count()}  (medians of {args.rounds} rounds)")
        for label, rates in (("wall, process start to exit", results),
                             ("in-job (img2dataset: shard time; paircurate: stats duration_s)",
                              inner_rates)):
            i2d, pc = statistics.median(rates["img2dataset"]), statistics.median(rates["paircurate"])
            print(f"{label}:\n  img2dataset {i2d:8.1f} rows/s  paircurate {pc:8.1f} rows/s  "
                  f"ratio paircurate/img2dataset {pc / i2d:.2f}")
        print(f"ok: img2dataset {successes['img2dataset']}/{args.n}, "
              f"paircurate {successes['paircurate']}/{args.n}")
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
