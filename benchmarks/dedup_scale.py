"""Dedup at scale on the local runner: synthetic slim records, time per size, growth ratios.

Records are minimal dicts (uid, status, phash, image_sha256, original sizes),
already hashed, so the run measures DeduplicateImages' graph: exact groups,
phash collapse, bucket keys, pair verification, label propagation and the
join back by uid.  Hashes are uniformly random 64-bit values except for the
planted structure: ``--clustered`` of the items sit in near-duplicate
clusters of 2-6 (members within max_distance/2 bits of the cluster's centre,
so within max_distance of each other), and ``--exact`` of the items repeat
another item's picture (same image_sha256).

Usage:  python benchmarks/dedup_scale.py [--sizes 250000 1000000 4000000]
Each size runs in its own process (python benchmarks/dedup_scale.py --one N).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from paircurate.transforms.beam_util import make_pipeline
from paircurate.transforms.dedup import DedupConfig, DeduplicateImages
from paircurate.transforms.phash import default_blocks, hash_hex, keys_per_hash

SHARD = 50_000


def shard_records(shard: int, size: int, clustered: float, exact: float, k: int):
    """The records of one shard; clusters never cross shards (they need not: uids are global)."""
    rng = random.Random(shard)
    start, stop = shard * SHARD, min(size, (shard + 1) * SHARD)
    flips = max(1, k // 2)
    i = start
    shas = []
    while i < stop:
        centre = rng.getrandbits(64)
        members = rng.randint(2, 6) if rng.random() < clustered / 4 else 1
        for _ in range(min(members, stop - i)):
            value = centre
            if members > 1:
                for bit in rng.sample(range(64), rng.randint(0, flips)):
                    value ^= 1 << bit
            sha = f"{rng.getrandbits(128):032x}"
            if rng.random() < exact and shas:
                sha = rng.choice(shas)  # the picture of an earlier item
            shas.append(sha)
            yield {"uid": f"{i:010d}", "status": "ok", "error": None, "phash": hash_hex(value),
                   "image_sha256": sha, "original_width": rng.randint(200, 2000),
                   "original_height": rng.randint(200, 2000), "low_information": False,
                   "duplicate_of": None, "image": None, "raw": None}
            i += 1


def _count_status(record):
    Metrics.counter("status", record["status"]).inc()


def run_one(size: int, clustered: float, exact: float) -> dict:
    config = DedupConfig()
    shards = (size + SHARD - 1) // SHARD
    start = time.time()
    pipeline = make_pipeline("DirectRunner")
    (pipeline
     | beam.Create(list(range(shards)))
     | beam.Reshuffle()
     | beam.FlatMap(shard_records, size, clustered, exact, config.max_distance)
     | DeduplicateImages(config)
     | beam.Map(_count_status))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.time() - start
    counters = result.metrics().query()["counters"]
    # A counter appears once per step that uses it (label_changes: once per clustering round): sum them.
    metrics, counts = {}, {}
    for m in counters:
        target = {"dedup": metrics, "status": counts}.get(m.key.metric.namespace)
        if target is not None:
            target[m.key.metric.name] = target.get(m.key.metric.name, 0) + (m.committed or 0)
    return {"size": size, "seconds": seconds, "counts": counts, "metrics": metrics}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--clustered", type=float, default=0.25)
    parser.add_argument("--exact", type=float, default=0.03)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.clustered, args.exact)))
        return
    config = DedupConfig()
    blocks = config.blocks or default_blocks(config.max_distance)
    print(f"max_distance={config.max_distance} blocks={blocks} "
          f"keys/hash={keys_per_hash(blocks, config.max_distance)} partitions={config.partitions}")
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size),
                              "--clustered", str(args.clustered), "--exact", str(args.exact)],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            break
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        growth = (f"  x{result['seconds'] / results[-2]['seconds']:.2f} for x"
                  f"{size / results[-2]['size']:.0f} items" if len(results) > 1 else "")
        print(f"{size:>9,d} items  {result['seconds']:7.1f}s  "
              f"{size / result['seconds']:8.0f} items/s{growth}", flush=True)
        print(f"           {result['counts']}  {result['metrics']}", flush=True)


if __name__ == "__main__":
    main()
