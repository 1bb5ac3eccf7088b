"""Semantic dedup: images whose CLIP image embeddings are nearly parallel are duplicates.

Runs after the CLIP stage and its filter, on the live records that were scored
(dedup.semantic.enabled; the CLIP stage then carries each scored record's
L2-normalised image embedding as float16 bytes in the transient field
``image_embedding``, which this stage drops from every record it passes on).
It catches what no perceptual hash does (crops, rotations, watermarks), the
route of SemDeDup and NeMo Curator, and it means something only with trained
weights: random weights (the tests' tiny model) embed unrelated images at
arbitrary cosines.

The graph, on slim tuples (every global step a shuffle):

1. sketch    each embedding -> ``bands * bits`` sign bits of random hyperplanes
             (SimHash: two vectors at angle t disagree on a bit with probability
             t / pi).  Every worker draws the same hyperplanes from ``seed``.
2. buckets   (band, the band's bits) keys, batched per partition as in the pHash
             search -> GroupByKey(partition) -> in each bucket, pairs whose whole
             sketches are within ``max_sketch_distance`` bits (the threshold's
             expected distance plus four standard deviations: a prefilter that
             loses about 3e-5 of the pairs at the threshold), each reported
             only in the first band they share.  Buckets over
             ``max_bucket_comparisons`` are compared in a sliding window.
3. verify    CoGroupByKey(node) of embeddings and candidate pairs, then
             GroupByKey(pair): the exact cosine of the two float16 embeddings;
             at ``min_cosine`` or above the pair is an edge.
4. cluster   dedup.propagate_labels (the pHash stage's clustering and its
             representative order: history, most original pixels, smallest uid).
5. decide    every image whose label is another -> duplicate_semantic, with
             duplicate_of the representative and error naming the cosine of its
             nearest pair and that image: ``semantic: cosine 0.973 to <uid>``.

Recall of the candidates at the threshold: 1 - (1 - p^bits)^bands with
p = 1 - arccos(min_cosine) / pi, times the prefilter's; measured on planted
pairs by benchmarks/semantic_recall.py (README, Semantic duplicates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from paircurate.transforms.beam_util import BatchedFn, metered_cogroup, metered_group
from paircurate.transforms.dedup import (
    DedupConfig,
    SemanticDedupConfig,
    apply_decisions,
    node_key,
    node_uid,
    propagate_labels,
)
from paircurate.transforms.phash import bucket_partition, rank, windowed_comparisons
from paircurate.transforms.schema import Status, is_live, pack_record, unpack_record
from paircurate.transforms.staging import decided_only

_NS = "semantic"
#: The transient record field that carries the image embedding (schema.TRANSIENT_FIELDS).
EMBEDDING_FIELD = "image_embedding"
#: Standard deviations of the sketch distance above its expectation at the threshold.
PREFILTER_SIGMAS = 4.0
#: Notes hold the cosine distance in millionths.
_MICRO = 1_000_000

#: (node_key, float16 embedding bytes)
SemSig = Tuple[bytes, bytes]


# --------------------------------------------------------------------------- embeddings

def embedding_bytes(vector: Sequence[float]) -> bytes:
    """An embedding L2-normalised (in float32), as float16 bytes: what records carry."""
    v = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(v))
    if norm > 0:
        v = v / norm
    return v.astype(np.float16).tobytes()


def embedding_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float16).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity (float16 rounding leaves the vectors a little off unit length)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b)) / (na * nb)


# --------------------------------------------------------------------------- sketches and bands

_PLANES: Dict[Tuple[int, int, int], np.ndarray] = {}


def hyperplanes(dim: int, count: int, seed: int) -> np.ndarray:
    """(dim, count) Gaussian hyperplane normals, the same on every worker for one seed."""
    key = (dim, count, seed)
    if key not in _PLANES:
        _PLANES[key] = np.random.default_rng(seed).standard_normal((dim, count), dtype=np.float32)
    return _PLANES[key]


def sketches(embeddings: np.ndarray, config: SemanticDedupConfig) -> np.ndarray:
    """(n, bands * bits / 8) uint8: the sign bits of every embedding against the hyperplanes."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    planes = hyperplanes(embeddings.shape[1], config.bands * config.bits, config.seed)
    return np.packbits(embeddings @ planes >= 0, axis=1)


def max_sketch_distance(min_cosine: float, nbits: int, sigmas: float = PREFILTER_SIGMAS) -> int:
    """The sketch prefilter's bound: expected Hamming distance at min_cosine + sigmas std devs."""
    q = math.acos(max(-1.0, min(1.0, min_cosine))) / math.pi
    return min(nbits, math.ceil(nbits * q + sigmas * math.sqrt(nbits * q * (1 - q))))


def expected_recall(cos: float, bands: int, bits: int) -> float:
    """Chance that a pair at cosine ``cos`` shares at least one band (before the prefilter)."""
    p = 1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
    return 1 - (1 - p ** bits) ** bands


def band_values(sketch: np.ndarray, band: int, band_bytes: int) -> np.ndarray:
    """The bits of one band of every sketch row, as uint64 (bands of at most 64 bits)."""
    cols = sketch[:, band * band_bytes:(band + 1) * band_bytes]
    padded = np.zeros((cols.shape[0], 8), dtype=np.uint8)
    padded[:, 8 - band_bytes:] = cols
    return padded.view(">u8").ravel().astype(np.uint64)


@dataclass
class BandStats:
    comparisons: int = 0
    candidates: int = 0
    overflowing: int = 0   # buckets over max_comparisons
    skipped: int = 0       # comparisons not made in those buckets


def band_pairs(band: int, values: np.ndarray, sketch: np.ndarray, tiebreak: np.ndarray,
               band_bytes: int, max_distance: int, max_comparisons: Optional[int] = None
               ) -> Tuple[np.ndarray, np.ndarray, BandStats]:
    """Index pairs (i, j) of rows that share ``band``'s bits and whose sketches are near.

    ``values``: each row's band bits; ``sketch``: the rows' whole sketches;
    ``tiebreak``: a total order of the rows (their node keys' order), so that a
    hot bucket's window does not depend on the order rows arrived in.  A pair
    that also shares an earlier band is left to that band (reported once).
    """
    stats = BandStats()
    n = values.size
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), stats
    columns = [tiebreak] + [sketch[:, c] for c in range(sketch.shape[1] - 1, -1, -1)] + [values]
    order = np.lexsort(columns)
    vals = values[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = vals[1:] != vals[:-1]
    remaining = windowed_comparisons(starts, max_comparisons, stats)
    sorted_sketch = sketch[order]
    earlier = band * band_bytes
    found_a, found_b = [], []
    active = np.flatnonzero(remaining >= 1)
    offset = 1
    while active.size:
        a, b = sorted_sketch[active], sorted_sketch[active + offset]
        near = np.bitwise_count(a ^ b).sum(axis=1, dtype=np.int64) <= max_distance
        if earlier:
            same = (a[:, :earlier] == b[:, :earlier]).reshape(-1, band, band_bytes).all(axis=2).any(axis=1)
            near &= ~same
        if near.any():
            found_a.append(order[active[near]])
            found_b.append(order[active[near] + offset])
        offset += 1
        active = active[remaining[active] >= offset]
    if not found_a:
        return np.empty(0, np.int64), np.empty(0, np.int64), stats
    i, j = np.concatenate(found_a), np.concatenate(found_b)
    stats.candidates = int(i.size)
    return i, j, stats


def candidate_pairs(embeddings: np.ndarray, config: SemanticDedupConfig) -> Tuple[np.ndarray, BandStats]:
    """(m, 2) index pairs (i < j) of candidate near pairs among embeddings, in one process.

    The same candidates as the Beam graph's buckets (benchmarks, tests); rows
    are ordered by their index where the graph orders them by node key.
    """
    sketch = sketches(embeddings, config)
    band_bytes = config.bits // 8
    limit = max_sketch_distance(config.min_cosine, config.bands * config.bits)
    tiebreak = np.arange(sketch.shape[0])
    total = BandStats()
    pairs = []
    for band in range(config.bands):
        i, j, stats = band_pairs(band, band_values(sketch, band, band_bytes), sketch, tiebreak,
                                 band_bytes, limit, config.max_bucket_comparisons)
        for name in ("comparisons", "candidates", "overflowing", "skipped"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        pairs.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1))
    return np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64), total


def semantic_edges(embeddings: np.ndarray, config: SemanticDedupConfig) -> List[Tuple[int, int, float]]:
    """(i, j, cosine) of the verified pairs among embeddings, in one process (tests, benchmarks)."""
    pairs, _ = candidate_pairs(embeddings, config)
    out = []
    for i, j in pairs.tolist():
        cos = cosine(embeddings[i], embeddings[j])
        if cos >= config.min_cosine:
            out.append((i, j, cos))
    return out


# --------------------------------------------------------------------------- decisions

def distance_note(cos: float) -> int:
    """A cosine as the cosine distance in millionths: notes sort nearest first."""
    return max(0, int(round((1.0 - cos) * _MICRO)))


def semantic_decision(node: bytes, label: bytes, note: Tuple[int, bytes]):
    """duplicate_semantic for a live image whose cluster's representative is another one."""
    if label == node or node[0] != 1:
        return []
    distance, neighbour = note
    cos = 1.0 - distance / _MICRO
    return [(node_uid(node), (Status.DUPLICATE_SEMANTIC.value, node_uid(label),
                              f"semantic: cosine {cos:.3f} to {node_uid(neighbour)}"))]


def record_node(record: Dict[str, Any]) -> bytes:
    """The clustering node of a record: its rank (as the pHash stage ranks it) as bytes."""
    return node_key(rank(record["uid"], record.get("original_width"), record.get("original_height")))


def has_embedding(record: Dict[str, Any]) -> bool:
    return is_live(record) and bool(record.get(EMBEDDING_FIELD))


def without_embedding(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record without its embedding: a copy (Beam's inputs must not be mutated; the
    record also feeds the signature step)."""
    if record.get(EMBEDDING_FIELD) is None:
        return record
    return dict(record, **{EMBEDDING_FIELD: None})


# --------------------------------------------------------------------------- DoFns

class _SketchFn(BatchedFn):
    """(node, embedding) -> (partition, (band indices, node keys, sketches)) batches."""

    def __init__(self, config: DedupConfig):
        super().__init__(min(config.key_batch, 4096))
        self._config = config.semantic
        self._partitions = config.partitions

    def emit_batch(self, batch: List[SemSig]):
        config = self._config
        nodes = [node for node, _ in batch]
        sketch = sketches(np.stack([embedding_array(e) for _, e in batch]), config)
        del batch  # the embeddings: only the sketches are needed from here
        band_bytes = config.bits // 8
        n = len(nodes)
        bands = np.repeat(np.arange(config.bands, dtype=np.uint8), n)
        values = np.concatenate([band_values(sketch, b, band_bytes) for b in range(config.bands)])
        parts = bucket_partition(bands, values, self._partitions)
        rows = np.tile(np.arange(n), config.bands)
        order = np.argsort(parts, kind="stable")
        cuts = np.flatnonzero(np.diff(parts[order])) + 1
        for chunk in np.split(order, cuts):
            picked = rows[chunk]
            yield int(parts[chunk[0]]), (bands[chunk].tobytes(), [nodes[i] for i in picked.tolist()],
                                         sketch[picked].tobytes())


class _BandPairsFn(beam.DoFn):
    def __init__(self, config: SemanticDedupConfig):
        self._config = config
        self._comparisons = Metrics.counter(_NS, "comparisons")
        self._candidates = Metrics.counter(_NS, "candidate_pairs")
        self._overflows = Metrics.counter(_NS, "bucket_overflows")
        self._skipped = Metrics.counter(_NS, "skipped_comparisons")

    def process(self, element):
        _, batches = element
        config = self._config
        width = config.bands * config.bits // 8
        band_bytes = config.bits // 8
        bands, nodes, rows = [], [], []
        for band_ids, batch_nodes, sketch_bytes in batches:
            bands.append(np.frombuffer(band_ids, dtype=np.uint8))
            nodes.extend(batch_nodes)
            rows.append(np.frombuffer(sketch_bytes, dtype=np.uint8).reshape(-1, width))
        bands = np.concatenate(bands)
        sketch = np.concatenate(rows)
        tiebreak = np.empty(len(nodes), dtype=np.int64)
        tiebreak[sorted(range(len(nodes)), key=nodes.__getitem__)] = np.arange(len(nodes))
        limit = max_sketch_distance(config.min_cosine, config.bands * config.bits)
        for band in np.unique(bands).tolist():
            sel = np.flatnonzero(bands == band)
            sub = sketch[sel]
            i, j, stats = band_pairs(band, band_values(sub, band, band_bytes), sub, tiebreak[sel],
                                     band_bytes, limit, config.max_bucket_comparisons)
            self._comparisons.inc(stats.comparisons)
            self._candidates.inc(stats.candidates)
            self._overflows.inc(stats.overflowing)
            self._skipped.inc(stats.skipped)
            for a, b in zip(sel[i].tolist(), sel[j].tolist()):
                x, y = nodes[a], nodes[b]
                if x != y:
                    yield min(x, y), max(x, y)


def _forward(element):
    """(node, {emb, partners}) -> ((a, b), (node, embedding)) for each candidate pair of the node."""
    node, grouped = element
    embeddings = list(grouped["emb"])
    if not embeddings:
        return
    for other in set(grouped["partners"]):
        yield (min(node, other), max(node, other)), (node, embeddings[0])


class _VerifyFn(beam.DoFn):
    """((a, b), two (node, embedding)) -> (a, b, cosine) when the cosine is at min_cosine or above;
    rejected pairs to the "rejected" output as (cosine, uid, uid)."""

    def __init__(self, min_cosine: float):
        self._min = min_cosine
        self._accepted = Metrics.counter(_NS, "verified_pairs")
        self._rejected = Metrics.counter(_NS, "rejected_pairs")

    def process(self, element):
        (a, b), sides = element
        by_node = dict(sides)
        if a not in by_node or b not in by_node:
            return
        cos = cosine(embedding_array(by_node[a]), embedding_array(by_node[b]))
        if cos >= self._min:
            self._accepted.inc()
            yield a, b, cos
        else:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput("rejected", (round(cos, 4), node_uid(a), node_uid(b)))


def _half_edges(edge):
    a, b, cos = edge
    distance = distance_note(cos)
    return [(a, (b, (distance, b))), (b, (a, (distance, a)))]


def _join(element):
    _, grouped = element
    decisions = list(grouped["decision"])
    for packed in grouped["record"]:
        yield apply_decisions(unpack_record(packed), decisions)


# --------------------------------------------------------------------------- PTransforms

#: How many of the rejected candidate pairs nearest the threshold a run reports (stats.json).
NEAREST_REJECTED = 20


class SemanticDecisions(beam.PTransform):
    """(node_key, float16 embedding bytes) -> (uid, (duplicate_semantic, representative, error)).

    ``rejected_path``: where to write the NEAREST_REJECTED candidate pairs below
    min_cosine, highest cosine first (JSON lists: cosine, uid, uid).
    """

    def __init__(self, config: DedupConfig, rejected_path: Optional[str] = None):
        super().__init__()
        self._config = config
        self._rejected_path = rejected_path

    def expand(self, sigs):
        config = self._config
        semantic = config.semantic
        batches = sigs | "Sketch" >> beam.ParDo(_SketchFn(config))
        pairs = (metered_group(batches, "SemanticBuckets")
                 | "BandPairs" >> beam.ParDo(_BandPairsFn(semantic)))  # each pair once: its first band
        partners = pairs | "PairsBothWays" >> beam.FlatMap(lambda p: [(p[0], p[1]), (p[1], p[0])])
        forwarded = (metered_cogroup({"emb": sigs, "partners": partners}, "SemanticJoinEmbeddings")
                     | "Forward" >> beam.FlatMap(_forward))
        verified = (metered_group(forwarded, "SemanticPairs")
                    | "Verify" >> beam.ParDo(_VerifyFn(semantic.min_cosine)).with_outputs(
                        "rejected", main="edges"))
        if self._rejected_path:
            from paircurate.transforms.files import write_json

            _ = (verified.rejected
                 | "NearestRejected" >> beam.combiners.Top.Largest(NEAREST_REJECTED)
                 | "WriteRejected" >> beam.Map(
                     lambda pairs, path: write_json(path, [list(p) for p in pairs]), self._rejected_path))
        half_edges = verified.edges | "BothWays" >> beam.FlatMap(_half_edges)
        return (propagate_labels(half_edges, config.cluster_rounds, _NS, "Semantic")
                | "Decide" >> beam.FlatMapTuple(lambda node, labelled: semantic_decision(node, *labelled)))


class SemanticDedup(beam.PTransform):
    """records -> records (same count): live records with an image embedding that are semantic
    duplicates of a better one become duplicate_semantic; every record leaves without its embedding.

    Live records cross the decisions' join slim (decided_only) when they are staged.
    """

    def __init__(self, config: DedupConfig, rejected_path: Optional[str] = None):
        super().__init__()
        self._config = config
        self._rejected_path = rejected_path

    def expand(self, records):
        live, others = records | "HasEmbedding" >> beam.Partition(
            lambda r, _: 0 if has_embedding(r) else 1, 2)
        others = others | "DropEmbedding" >> beam.Map(without_embedding)
        sigs = live | "Signature" >> beam.Map(lambda r: (record_node(r), r[EMBEDDING_FIELD]))
        decisions = sigs | "Decide" >> SemanticDecisions(self._config, self._rejected_path)
        keyed = live | "KeyByUid" >> beam.Map(
            lambda r: (r["uid"], pack_record(decided_only(without_embedding(r)))))
        joined = (metered_cogroup({"record": keyed, "decision": decisions}, "SemanticJoinDecisions")
                  | "Apply" >> beam.FlatMap(_join))
        return (joined, others) | "All" >> beam.Flatten()
