"""How long `paircurate report` takes on a large synthetic output folder.

Writes an output folder holding a synthetic ledger of N rows (every status,
error classes, CLIP scores, duplicate clusters, and the columns of the
language, tag/head and semantic-dedup stages: caption_language,
caption_language_score, tag_*, head_*; --without-newer leaves those out), a
stats.json that matches it and two small shards, then times build_report()
over a few rounds after one warm-up and prints the median wall and CPU time
(CPU time is steadier on a shared machine).  Not part of the tests.

    .venv/bin/python benchmarks/report_scale.py --rows 50000 --rounds 5 [--without-newer]
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STATUSES = {  # status -> share of rows
    "ok": 0.40, "invalid_input": 0.01, "caption_filtered": 0.03, "language_filtered": 0.05,
    "duplicate_input": 0.02, "fetch_failed": 0.20, "disallowed": 0.01, "blocked_address": 0.005,
    "decode_failed": 0.02, "size_filtered": 0.03, "duplicate_exact": 0.03, "duplicate_near": 0.03,
    "clip_filtered": 0.12, "tag_filtered": 0.02, "duplicate_semantic": 0.025,
}
ERRORS = {"fetch_failed": ["http_404", "timeout: read after 30 s", "dns: no such host", "connection"],
          "decode_failed": ["corrupt: truncated"], "invalid_input": ["url: no scheme"],
          "caption_filtered": ["caption: too short"], "size_filtered": ["size: 20x20"],
          "duplicate_exact": ["exact"], "language_filtered": ["language: de"],
          "tag_filtered": ["tag: nsfw 0.93"]}
LANGUAGES = ["en"] * 12 + ["de", "fr", "es", "it", "pt", "nl", "ja", "zh", "ru", "pl", "sv", "ko",
                           "tr", "ar", "fi", "cs", "el", "hu", None]


NEWER_STATUSES = ("language_filtered", "tag_filtered", "duplicate_semantic")


def synthetic_ledger(n: int, seed: int = 0, newer: bool = True) -> pa.Table:
    """A ledger of ``n`` rows; ``newer``: with the language, tag/head and semantic-dedup stages."""
    rng = np.random.default_rng(seed)
    names = [s for s in STATUSES if newer or s not in NEWER_STATUSES]
    shares = np.array([STATUSES[s] for s in names])
    status = rng.choice(names, size=n, p=shares / shares.sum())
    uid = [f"{i:032x}" for i in range(n)]
    error, duplicate_of, clip = [], [], []
    reps = [uid[i] for i in range(0, n, 97)]
    for i, s in enumerate(status):
        if s in ("duplicate_exact", "duplicate_near", "duplicate_semantic"):
            rep = reps[int(rng.integers(len(reps)))]
            duplicate_of.append(rep)
            error.append({"duplicate_exact": "exact",
                          "duplicate_near": f"near: {rng.choice(['phash', 'smooth', 'flip'])} distance=3 verify=0.20",
                          "duplicate_semantic": f"semantic: cosine 0.97{i % 10} to {rep}"}[s])
        else:
            duplicate_of.append(None)
            error.append(str(rng.choice(ERRORS[s])) if s in ERRORS else None)
    scored = np.isin(status, ["ok", "clip_filtered", "tag_filtered", "duplicate_semantic"])
    scores = np.where(status == "clip_filtered", rng.normal(0.18, 0.03, n), rng.normal(0.32, 0.03, n))
    clip = pa.array(np.where(scored, scores, np.nan).astype(np.float32), mask=~scored)
    language = [LANGUAGES[int(j)] for j in rng.integers(len(LANGUAGES), size=n)]
    captioned = status != "invalid_input"
    table = pa.table({
        "uid": uid, "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "caption": [f"a photo number {i}" for i in range(n)], "status": status.tolist(), "error": error,
        "shard": [f"{(i // 1000):05d}" if s == "ok" else None for i, s in enumerate(status)],
        "duplicate_of": duplicate_of, "clip_score": clip,
        "caption_language": pa.array([lang if c else None for lang, c in zip(language, captioned)], pa.string()),
        "caption_language_score": pa.array(rng.uniform(0.3, 1.0, n).astype(np.float32)),
    })
    if not newer:
        return table.drop_columns(["caption_language", "caption_language_score"])
    for name in ("nsfw", "watermark", "text"):
        table = table.append_column(f"tag_{name}", pa.array(rng.beta(1, 6, n).astype(np.float32), mask=~scored))
    table = table.append_column("head_aesthetic", pa.array(rng.normal(5, 1, n).astype(np.float32), mask=~scored))
    return table


def write_shard(path: str, keys, captions) -> int:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, (key, caption) in enumerate(zip(keys, captions)):
            out = io.BytesIO()
            Image.new("RGB", (256, 192), ((i * 37) % 256, 90, 160)).save(out, format="JPEG")
            for ext, data in (("jpg", out.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"caption": caption, "clip_score": 0.3}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def write_output(folder: str, n: int, newer: bool = True) -> None:
    table = synthetic_ledger(n, newer=newer)
    os.makedirs(os.path.join(folder, "metadata"))
    os.makedirs(os.path.join(folder, "shards"))
    half = n // 2
    pq.write_table(table.slice(0, half), os.path.join(folder, "metadata", "part-00000.parquet"))
    pq.write_table(table.slice(half), os.path.join(folder, "metadata", "part-00001.parquet"))
    ok = table.filter(pa.compute.equal(table["status"], "ok")).slice(0, 40)
    shard_bytes = sum(write_shard(os.path.join(folder, "shards", f"{j:05d}.tar"),
                                  ok["uid"].to_pylist()[j * 20:(j + 1) * 20],
                                  ok["caption"].to_pylist()[j * 20:(j + 1) * 20]) for j in range(2))
    by_status = dict(collections.Counter(table["status"].to_pylist()))
    stats = {"by_status": by_status, "ledger_rows": n, "rows_in": n, "kept": by_status["ok"], "shards": 2,
             "shard_bytes": shard_bytes, "duration_s": 600.0, "rows_per_s": n / 600.0,
             "started": "2026-11-27T04:00:00+00:00", "versions": {"paircurate": "0.1.0"},
             "config": {"clip": {"min_score": 0.25, "keep_fraction": None}, "dedup": {"verify_max_distance": 0.5}},
             "stages": {"fetch": {"records": n, "busy_s": 1000.0, "ms_per_record": 20.0}}}
    with open(os.path.join(folder, "stats.json"), "w") as handle:
        json.dump(stats, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--without-newer", action="store_true",
                        help="leave out the language, tag/head and semantic-dedup columns and statuses")
    args = parser.parse_args()
    from paircurate.report import build_report

    with tempfile.TemporaryDirectory() as base:
        folder = os.path.join(base, "out")
        write_output(folder, args.rows, newer=not args.without_newer)
        build_report(folder)  # warm-up: imports, matplotlib's font cache
        times, cpu = [], []
        for _ in range(args.rounds):
            started, cpu_started = time.perf_counter(), time.process_time()
            page = build_report(folder)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        print(f"rows={args.rows} page={len(page):,} bytes wall={['%.2f' % t for t in times]} "
              f"median wall={statistics.median(times):.2f} s, median CPU={statistics.median(cpu):.2f} s")


if __name__ == "__main__":
    main()
