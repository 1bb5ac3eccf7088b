"""Recall and cost of semantic dedup's LSH candidates on synthetic embeddings with planted pairs.

``--n`` unit vectors of ``--dim`` dimensions: bases, and for ``--planted`` of
them a copy at a cosine drawn uniformly from [``--low``, ``--high``] (0.90 to
0.99: around the default threshold 0.95).  ``--background`` shifts every base
towards one common direction so that unrelated vectors have about that cosine
(trained CLIP image embeddings are not isotropic: unrelated photographs are
typically at 0.3-0.6), which fills the LSH buckets as real data would; recall
does not depend on it (random hyperplanes are rotation invariant), cost does.

For each (bands, bits) setting it runs transforms/semantic.py's candidate
search and exact-cosine verification (the same functions as the Beam graph,
in one process) on the float16 embeddings the pipeline carries, and prints:
the expected recall at min_cosine (1 - (1 - p^bits)^bands), the measured
recall of planted pairs at the threshold (cosine in [min, min + 0.005)) and
over all planted pairs at or above it, wrong merges (pairs below the
threshold are never accepted; this counts accepted pairs of unrelated vectors), candidates and comparisons
per row, and the bytes per row the bucket shuffle carries (one Beam-encoded
batch, measured).

Usage:  python benchmarks/semantic_recall.py [--n 100000 --dim 512 --settings 16x16 23x16 30x16]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from paircurate.transforms import semantic
from paircurate.transforms.dedup import DedupConfig, SemanticDedupConfig, node_key
from paircurate.transforms.phash import rank


def unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def make_set(n: int, dim: int, planted: int, low: float, high: float, background: float, seed: int):
    rng = np.random.default_rng(seed)
    bases = unit_rows(rng.standard_normal((n - planted, dim)).astype(np.float32))
    if background > 0:  # mix in a shared direction: unrelated pairs then sit near `background`
        common = unit_rows(rng.standard_normal((1, dim)).astype(np.float32))
        bases = unit_rows(np.sqrt(background) * common + np.sqrt(1 - background) * bases)
    idx = rng.choice(len(bases), planted, replace=False)
    cos = rng.uniform(low, high, planted)
    u = rng.standard_normal((planted, dim)).astype(np.float32)
    b = bases[idx]
    u = unit_rows(u - (u * b).sum(1, keepdims=True) * b)
    copies = cos[:, None] * b + np.sqrt(1 - cos ** 2)[:, None] * u
    embeddings = np.concatenate([bases, copies.astype(np.float32)])
    # What the pipeline carries: L2-normalised float16.
    embeddings = unit_rows(embeddings.astype(np.float16).astype(np.float32))
    truth = [(int(i), len(bases) + k) for k, i in enumerate(idx)]
    actual = (embeddings[idx] * embeddings[len(bases):]).sum(1)
    return embeddings, truth, actual


def bucket_bytes_per_row(embeddings: np.ndarray, config: SemanticDedupConfig, rows: int = 2000) -> float:
    """Bytes per row entering the bucket shuffle: one worker batch encoded with Beam's coder."""
    from apache_beam.coders import FastPrimitivesCoder

    coder = FastPrimitivesCoder()
    fn = semantic._SketchFn(DedupConfig(semantic=config, partitions=4096))
    fn.start_bundle()
    sigs = [(node_key(rank(f"{i:032x}", 640, 480)), semantic.embedding_bytes(e))
            for i, e in enumerate(embeddings[:rows])]
    out = []
    for sig in sigs:
        out.extend(fn.process(sig))
    out.extend(w.value for w in fn.finish_bundle())
    return sum(len(coder.encode(e)) for e in out) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--planted", type=int, default=20_000)
    parser.add_argument("--low", type=float, default=0.90)
    parser.add_argument("--high", type=float, default=0.99)
    parser.add_argument("--min-cosine", type=float, default=0.95)
    parser.add_argument("--background", type=float, default=0.0)
    parser.add_argument("--settings", nargs="+", default=["16x16", "23x16", "30x16", "57x24"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    embeddings, truth, actual = make_set(args.n, args.dim, args.planted, args.low, args.high,
                                         args.background, args.seed)
    rng = np.random.default_rng(0)
    sample = rng.integers(0, args.n, (20000, 2))
    background = float(np.mean((embeddings[sample[:, 0]] * embeddings[sample[:, 1]]).sum(1)))
    print(f"{args.n} vectors of dim {args.dim}, {args.planted} planted pairs at cosine "
          f"{args.low}-{args.high}, unrelated pairs at mean cosine {background:.3f}; "
          f"threshold {args.min_cosine}")
    at = (actual >= args.min_cosine) & (actual < args.min_cosine + 0.005)
    above = actual >= args.min_cosine
    print("bands x bits | expected recall | recall at threshold | recall >= threshold | wrong merges "
          "| candidates/row | comparisons/row | bucket shuffle B/row | seconds")
    for setting in args.settings:
        bands, bits = (int(x) for x in setting.split("x"))
        config = SemanticDedupConfig(enabled=True, min_cosine=args.min_cosine, bands=bands, bits=bits)
        started = time.perf_counter()
        pairs, stats = semantic.candidate_pairs(embeddings, config)
        a, b = pairs[:, 0], pairs[:, 1]
        cos = (embeddings[a] * embeddings[b]).sum(1)
        accepted = cos >= args.min_cosine
        seconds = time.perf_counter() - started
        found = set(map(tuple, pairs[accepted].tolist()))
        hit = np.array([t in found for t in truth])
        wrong = len(found - set(truth))  # accepted pairs of unrelated vectors
        print(f"{bands} x {bits} | {semantic.expected_recall(args.min_cosine, bands, bits):.4f} | "
              f"{hit[at].mean():.4f} ({at.sum()} pairs) | {hit[above].mean():.4f} ({above.sum()} pairs) | "
              f"{wrong} | {len(pairs) / args.n:.3f} | {stats.comparisons / args.n:.1f} "
              f"(overflowing buckets {stats.overflowing}) | "
              f"{bucket_bytes_per_row(embeddings, config):.0f} | {seconds:.1f}")


if __name__ == "__main__":
    main()
