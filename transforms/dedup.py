"""Exact and perceptual image dedup, within the run and against the ledgers of earlier runs.

The graph (every global step is a shuffle; nothing collects all hashes in one worker):

1. hash     live records -> image_sha256, phash, low_information, near_signature
            (phash.near_entries: search hashes + thumbnails); raw dropped.
2. slim     (uid, rank, sha256, phash, low, near entries) signatures; the records
            wait, keyed by uid, for the decisions (staged records, their details
            and bytes in staging, so only decided fields cross that join).
            History rows (status ok) join as signatures that always win.
3. exact    GroupByKey(sha256): the best-ranked signature survives, the others
            are duplicate_exact of it.
4. entries  each survivor's near entries, keyed by search hash (none for
            low-information, i.e. truly flat, images).  Distinct search hashes
            go to the candidate search, so identical hashes are searched once.
5. pairs    bucket keys per distinct hash (phash.py: pigeonhole blocks), batched
            per worker into numpy arrays per partition -> GroupByKey(partition)
            -> candidate hash pairs within max_distance, each once.
6. verify   CoGroupByKey(hash) of entries and candidate pairs: the entries of a
            hash are verified among themselves and forwarded to each candidate
            neighbour; a second CoGroupByKey verifies them against the
            neighbour's entries (phash.verify_distance on the thumbnails).  Only
            verified pairs become edges between images (nodes are ranks).
7. cluster  min-label propagation over the edges, ``cluster_rounds`` rounds
            (one GroupByKey each; only changed labels are re-sent).  A node's
            label is the best rank reachable from it, so the cluster's
            representative is its best member: history first, then the largest
            original pixel count, then the smallest uid -- a total order, so
            the choice does not depend on element order or runner.  Clusters of
            diameter <= cluster_rounds converge exactly; beyond that a node may
            point at a better node that itself points further (duplicate_of
            chains that end at a kept image; metric dedup/unconverged_nodes).
8. decide   every live node whose label is another image -> duplicate_near, its
            error naming the signal and distances of its nearest verified pair;
            all decisions joined back to the records by uid.

Defaults, measured by benchmarks/near_duplicate_quality.py --photographs (425
distinct crops of 24 photographs from Debian's wallpaper packages, 17
transformed copies each; README, Deduplication, has the table):

* max_distance = 6 (search hashes).  pHash sets (almost always) exactly half
  of its 64 bits, so distances are even and k=7 behaves like k=6.
* smooth_below = 4.0: below it (16% of the photographs: sky, water, fog)
  the pHash follows JPEG noise (copies 8-18 bits away); the smooth hash keeps
  99% of their re-encodes within 6 bits.  Within x1.5 of it an image gets both.
* verification (phash.verify_distance tolerances): copies of non-flat bases
  found 99-100% for re-encodes, resizes, brightness, contrast, greyscale and
  flips, distinct bases wrongly merged 0.47% (0% of the textured ones).
* min_information = 1.5 grey levels: below it (8% of the photographs: fog,
  haze, gradient skies) distinct crops of one sky differ from each other by
  little more than a brightness or contrast copy does, so their pairs are
  verified by the strict low-contrast rule (phash.verify_distance): nothing
  left after the best affine luma fit (0.7 levels) and the chroma within 1
  level; a thumbnail without luma structure is near nothing (exact dedup
  only).  The earlier rule left every image under 0.75 to exact dedup
  (5.4% of the photographs, none of their copies caught).
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from paircurate.beam_util import metered_cogroup, metered_group
from paircurate.config import DedupConfig
from paircurate.schema import Status, is_live, mark, pack_record, unpack_record
from paircurate.transforms.staging import decided_only
from paircurate.transforms.phash import (LOW_CONTRAST, MIRRORED, SMOOTH, Rank, bucket_entries, bucket_pairs,
                                         bucket_partition, default_blocks, hamming, hash_hex,
                                         hash_int, key_masks, rank, signature, split_entries,
                                         verify_distance)

_NS = "dedup"

#: (uid, rank, image_sha256 or None, phash int or None, low_information, near entries)
#: near entries: phash.near_entries() bytes (b"" for flat images; None when unknown, e.g.
#: a ledger from before near_signature: then the pHash is the entry, unverified).
Sig = Tuple[str, Rank, Optional[str], Optional[int], bool, Optional[bytes]]
#: One entry of the near search: (node_key(rank), flags, thumbnail), keyed by its search hash.
Entry = Tuple[bytes, int, bytes]
#: (why: "phash" | "smooth" | "flip", Hamming distance of the search hashes, verification distance)
EdgeNote = Tuple[str, int, float]
#: (uid, (status, duplicate_of, error))
Decision = Tuple[str, Tuple[str, str, str]]


# --------------------------------------------------------------------------- pure record steps

def hash_record(record: Dict[str, Any], config: DedupConfig) -> Dict[str, Any]:
    """Fill image_sha256, phash, low_information, near_signature of a live record; drop its raw bytes.

    Hashes the original (``raw``); falls back to the resized ``image`` when raw
    is gone.  A record that already carries image_sha256 (slim records,
    re-runs) keeps its signatures.
    """
    if not is_live(record):
        return record
    data = record.get("raw") or record.get("image")
    if data:
        try:
            sig = signature(data, config.hash, config.hash_size, config.min_information,
                            config.smooth_below, config.flips)
        except Exception as exc:  # the resize stage decoded it, so this is rare
            return mark(record, Status.DECODE_FAILED, f"corrupt: {type(exc).__name__}")
        record["image_sha256"] = sig.sha256
        record["phash"] = hash_hex(sig.phash, config.hash_size ** 2)
        record["low_information"] = sig.information < config.min_information
        record["near_signature"] = sig.near.hex()
    elif record.get("image_sha256") is None:
        return mark(record, Status.DECODE_FAILED, "no_image")
    if record.get("low_information") is None:
        record["low_information"] = False
    record["raw"] = None
    return record


def _near_bytes(text: Optional[str]) -> Optional[bytes]:
    return bytes.fromhex(text) if text is not None else None


def record_signature(record: Dict[str, Any]) -> Sig:
    phash = record.get("phash")
    return (record["uid"],
            rank(record["uid"], record.get("original_width"), record.get("original_height")),
            record.get("image_sha256"), hash_int(phash) if phash else None,
            bool(record.get("low_information")), _near_bytes(record.get("near_signature")))


def history_signature(row: Dict[str, Any]) -> Sig:
    phash = row.get("phash")
    return (row["uid"], rank(row["uid"], 0, 0, history=True), row.get("image_sha256"),
            hash_int(phash) if phash else None, bool(row.get("low_information")),
            _near_bytes(row.get("near_signature")))


def near_entries_of(sig: Sig) -> List[Tuple[int, Entry]]:
    """(search hash, (node_key(rank), flags, thumbnail)) for each entry of a signature.

    Low-information images have entries flagged LOW_CONTRAST (verified by the
    strict rule); in ledgers from before that rule they have none.  A
    signature without near_signature (an older ledger, hand-made records) has
    its pHash as its one entry, without a thumbnail: its pairs are not verified.
    """
    _, rank_, _, phash, low, near = sig
    if low and not near:
        return []
    node = node_key(rank_)
    if near is None:
        return [(phash, (node, 0, b""))] if phash is not None else []
    return [(search, (node, flags, thumb)) for flags, search, thumb in split_entries(near)]


def edge_note(a: Entry, b: Entry, search_a: int, search_b: int) -> EdgeNote:
    """Why two entries are near duplicates (the signal that found them) and how near they are."""
    if (a[1] ^ b[1]) & MIRRORED:
        why = "flip"
    elif (a[1] | b[1]) & SMOOTH:
        why = "smooth"
    else:
        why = "phash"
    low_contrast = bool((a[1] | b[1]) & LOW_CONTRAST)
    distance = verify_distance(a[2], b[2], low_contrast) if a[2] and b[2] else 0.0
    return why, hamming(search_a, search_b), round(distance, 3)


def verified_edges(group_a: Iterable[Entry], group_b: Optional[Iterable[Entry]], search_a: int,
                   search_b: int, config: DedupConfig, max_comparisons: Optional[int] = None,
                   with_nodes: bool = False) -> Tuple[List[Tuple[bytes, bytes, EdgeNote]], List]:
    """Verified pairs between two groups of entries (or within one, when group_b is None).

    Returns (accepted (node, node, note) edges, the rejected pairs' notes, or
    with ``with_nodes`` their (node, node, note)).
    Entries of one image (both orientations) never pair with each other.
    ``max_comparisons`` bounds the pairs looked at (like a hot bucket's window).
    """
    a = sorted(group_a)  # a fixed order: the bounded window below must not depend on the runner
    pairs = (itertools.combinations(a, 2) if group_b is None
             else itertools.product(a, sorted(group_b)))
    if max_comparisons is not None:
        pairs = itertools.islice(pairs, max_comparisons)
    accepted, rejected = [], []
    for x, y in pairs:
        if x[0] == y[0]:
            continue
        note = edge_note(x, y, search_a, search_b)
        if not config.verify or note[2] <= config.verify_max_distance:
            accepted.append((min(x[0], y[0]), max(x[0], y[0]), note))
        else:
            rejected.append((x[0], y[0], note) if with_nodes else note)
    return accepted, rejected


#: How many of the nearest rejected pairs a run reports (stats.json, report.html).
NEAREST_REJECTED = 20


def rejected_pair(a: bytes, b: bytes, note: EdgeNote) -> Tuple[float, int, str, str, str]:
    """(verification distance, Hamming distance, signal, uid, uid) of a rejected pair: sorts nearest first."""
    why, distance, verify = note
    return verify, distance, why, node_uid(a), node_uid(b)


def apply_decisions(record: Dict[str, Any], decisions: List[Tuple[str, str, str]]) -> Dict[str, Any]:
    """Mark a record with its (single) decision; a record without one is kept."""
    if decisions:
        status, duplicate_of, error = min(decisions)
        mark(record, Status(status), error)
        record["duplicate_of"] = duplicate_of  # after mark(), which leaves it alone
    return record


def sha_keyed(sig: Sig) -> Tuple[bytes, Sig]:
    """(sha256 as bytes, the signature without it): the exact step's shuffle carries the digest once."""
    uid, rank_, sha, phash, low, near = sig
    try:
        key = bytes.fromhex(sha) if sha else b""
    except ValueError:  # not hex (a hand-made history ledger): the text itself is the key
        key = sha.encode("utf-8")
    return key, (uid, rank_, None, phash, low, near)


def exact_group(sigs: Iterable[Sig]) -> Tuple[Sig, Iterable[Decision]]:
    """The best signature of one sha256 group, and duplicate_exact for the live others.

    ``sigs`` is iterated twice (a GroupByKey result may be, and is not held in memory).
    """
    best = min(sigs, key=lambda s: s[1])
    decisions = ((s[0], (Status.DUPLICATE_EXACT.value, best[0], "exact"))
                 for s in sigs if s[1] != best[1] and s[1][0] == 1)
    return best, decisions


def near_edges(sigs: List[Sig], config: DedupConfig) -> List[Tuple[str, str]]:
    """(uid, uid) near-duplicate pairs among signatures, in one process (benchmarks, tests).

    The same decisions as the Beam graph's candidate and verification steps,
    without clusters: connected components of these edges are its clusters.
    """
    from paircurate.transforms.phash import near_pairs

    by_search: Dict[int, List[Entry]] = {}
    for sig in sigs:
        for search, entry in near_entries_of(sig):
            by_search.setdefault(search, []).append(entry)
    distinct = np.array(sorted(by_search), dtype=np.uint64)
    value_pairs, _ = near_pairs(distinct, config.max_distance, config.hash_size ** 2,
                                config.blocks or None, config.max_bucket_comparisons)
    edges = []
    for search, group in by_search.items():
        edges += verified_edges(group, None, search, search, config)[0]
    for a, b in value_pairs.tolist():
        edges += verified_edges(by_search[a], by_search[b], a, b, config)[0]
    return [(node_uid(x), node_uid(y)) for x, y, _ in edges]


_WHY = ("phash", "smooth", "flip")
_MAX_PIXELS = (1 << 63) - 1


def node_key(rank_: Rank) -> bytes:
    """A rank as compact bytes whose order is the rank's: the clustering's node ids and labels.

    (history flag, largest pixel count first, uid): 1 + 8 + 1 + 16 bytes for a
    hex uid, where the tuple costs a pickle of three objects in every message.
    """
    flag, negative_pixels, uid = rank_
    try:
        raw = bytes.fromhex(uid)
        uid_bytes = b"\x00" + raw if raw.hex() == uid else None
    except ValueError:
        uid_bytes = None
    if uid_bytes is None:  # not lowercase hex (hand-made ledgers, tests): its text
        uid_bytes = b"\x01" + uid.encode("utf-8")
    return bytes([flag]) + (_MAX_PIXELS + negative_pixels).to_bytes(8, "big") + uid_bytes


def node_uid(key: bytes) -> str:
    return key[10:].hex() if key[9] == 0 else key[10:].decode("utf-8")


def pack_note(note: EdgeNote) -> int:
    """An edge note as one int (why, Hamming distance, verification distance in thousandths)."""
    why, distance, verify = note
    return (int(round(verify * 1000)) << 10) | (distance << 2) | _WHY.index(why)


def unpack_note(packed: int) -> EdgeNote:
    return _WHY[packed & 3], (packed >> 2) & 255, (packed >> 10) / 1000


def near_decision(node: bytes, label: bytes, note: int) -> List[Decision]:
    """duplicate_near for a live image whose cluster's representative is another one.

    The error names the signal of the image's nearest verified pair and its
    distances: ``near: phash distance=4 verify=0.31`` (``smooth``, ``flip``).
    """
    if label == node or node[0] != 1:
        return []
    why, distance, verify = unpack_note(note)
    return [(node_uid(node), (Status.DUPLICATE_NEAR.value, node_uid(label),
                              f"near: {why} distance={distance} verify={verify:.2f}"))]


def resolve_exact(element) -> Iterator[Decision]:
    """Exact-copy decisions of one target, re-pointed when the target is a near duplicate."""
    target, grouped = element
    near = list(grouped["near"])
    for uid, decision in grouped["exact"]:
        if near:
            _, representative, _ = near[0]
            yield uid, (Status.DUPLICATE_NEAR.value, representative, f"near: exact copy of {target}")
        else:
            yield uid, decision


# --------------------------------------------------------------------------- DoFns

class _HashFn(beam.DoFn):
    def __init__(self, config: DedupConfig):
        self._config = config
        self._low = Metrics.counter(_NS, "low_information")

    def process(self, record):
        hashing = bool(record.get("raw") or record.get("image"))  # else: already hashed, or no bytes
        record = hash_record(record, self._config)
        if hashing and is_live(record) and record["low_information"]:
            self._low.inc()
        yield record


class _ExactFn(beam.DoFn):
    def __init__(self):
        self._dups = Metrics.counter(_NS, "exact_duplicates")

    def process(self, element):
        _, sigs = element
        best, decisions = exact_group(sigs)
        yield best
        for decision in decisions:
            self._dups.inc()
            yield beam.pvalue.TaggedOutput("decisions", decision)


class _KeyBatchFn(beam.DoFn):
    """Distinct hashes -> (partition, (key indices, hashes)) arrays, one element per partition and batch."""

    def __init__(self, masks: np.ndarray, partitions: int, batch: int):
        self._masks, self._partitions, self._batch = masks, partitions, batch

    def start_bundle(self):
        self._buffer: List[int] = []

    def _flush(self):
        if not self._buffer:
            return
        keys, hashes, masked = bucket_entries(np.array(self._buffer, dtype=np.uint64), self._masks)
        self._buffer = []
        part = bucket_partition(keys, masked, self._partitions)
        order = np.argsort(part, kind="stable")
        part, keys, hashes = part[order], keys[order], hashes[order]
        cuts = np.flatnonzero(np.diff(part)) + 1
        # Raw bytes, not arrays: the shuffle then carries 9 bytes per entry, not a pickle per element.
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, part.size]):
            yield int(part[start]), (keys[start:stop].tobytes(), hashes[start:stop].tobytes())

    def process(self, phash):
        self._buffer.append(phash)
        if len(self._buffer) >= self._batch:
            yield from self._flush()

    def finish_bundle(self):
        for element in self._flush():
            yield GlobalWindows.windowed_value(element)


class _PairsFn(beam.DoFn):
    def __init__(self, masks: np.ndarray, max_distance: int, max_comparisons: int):
        self._masks, self._k, self._max = masks, max_distance, max_comparisons
        self._comparisons = Metrics.counter(_NS, "comparisons")
        self._pairs = Metrics.counter(_NS, "near_pairs")
        self._overflows = Metrics.counter(_NS, "bucket_overflows")
        self._skipped = Metrics.counter(_NS, "skipped_comparisons")

    def process(self, element):
        _, batches = element
        batches = list(batches)
        keys = np.concatenate([np.frombuffer(b[0], dtype=np.uint8) for b in batches])
        hashes = np.concatenate([np.frombuffer(b[1], dtype=np.uint64) for b in batches])
        pairs, stats = bucket_pairs(keys, hashes, self._masks, self._k, self._max)
        self._comparisons.inc(stats.comparisons)
        self._pairs.inc(stats.pairs)
        self._overflows.inc(stats.overflowing)
        self._skipped.inc(stats.skipped)
        for a, b in pairs.tolist():
            yield a, b


class _VerifyFn(beam.DoFn):
    """Candidate pairs of search hashes -> verified (node, node, packed note) edges between images.

    Step "within" (keyed by a search hash, with its candidate neighbours): the
    pairs among its entries, and its entries forwarded under each candidate
    pair's key.  Step "across" (keyed by a candidate pair): the two hashes'
    entries against each other.  Entries of hashes without candidates are
    shuffled once, in "within", and never forwarded.
    """

    def __init__(self, config: DedupConfig, step: str):
        self._config, self._step = config, step
        self._accepted = Metrics.counter(_NS, "verified_pairs")
        self._rejected = Metrics.counter(_NS, "rejected_pairs")
        self._nearest = Metrics.distribution(_NS, "rejected_verify_milli")

    def _edges(self, group_a, group_b, search_a, search_b):
        accepted, rejected = verified_edges(group_a, group_b, search_a, search_b, self._config,
                                            self._config.max_bucket_comparisons, with_nodes=True)
        self._accepted.inc(len(accepted))
        self._rejected.inc(len(rejected))
        for a, b, note in rejected:
            self._nearest.update(int(note[2] * 1000))
            yield beam.pvalue.TaggedOutput("rejected", rejected_pair(a, b, note))
        for a, b, note in accepted:
            yield a, b, pack_note(note)

    def process(self, element):
        key, grouped = element
        if self._step == "within":
            entries = list(grouped["entries"])
            if not entries:
                return
            if len(entries) > 1:
                yield from self._edges(entries, None, key, key)
            for other in grouped["pairs"]:
                yield beam.pvalue.TaggedOutput(
                    "forward", ((min(key, other), max(key, other)), (key, entries)))
        else:
            sides = dict(grouped)
            if len(sides) == 2:
                (a, entries_a), (b, entries_b) = sorted(sides.items())
                yield from self._edges(entries_a, entries_b, a, b)


def _initial_state(element):
    node, edges = element
    neighbours, notes = set(), []
    for other, note in edges:
        neighbours.add(other)
        notes.append(note)
    # The nearest pair by verification distance, then Hamming distance (the packed int's order).
    yield node, (node, sorted(neighbours), True, min(notes))


def _send(element):
    node, (label, neighbours, changed, note) = element
    yield node, (0, label, neighbours, note)
    if changed:
        for other in neighbours:
            yield other, (1, label, None, None)


class _UpdateFn(beam.DoFn):
    def __init__(self, counter: str, namespace: str = _NS):
        self._changed = Metrics.counter(namespace, counter)

    def process(self, element):
        node, messages = element
        own, neighbours, best, note = None, None, None, None
        for kind, label, nbrs, nt in messages:
            if kind == 0:
                own, neighbours, note = label, nbrs, nt
            if best is None or label < best:
                best = label
        changed = best != own
        if changed:
            self._changed.inc()
        yield node, (best, neighbours, changed, note)


def _join(element):
    _, grouped = element
    decisions = list(grouped["decision"])
    for packed in grouped["record"]:
        yield apply_decisions(unpack_record(packed), decisions)


# --------------------------------------------------------------------------- PTransforms

class ReadHistory(beam.PTransform):
    """Signatures of the ok rows of earlier ledgers (Parquet paths or globs)."""

    COLUMNS = ["uid", "status", "phash", "image_sha256", "low_information", "near_signature"]

    def __init__(self, patterns: List[str]):
        super().__init__()
        self._patterns = list(patterns)

    def expand(self, pbegin):
        from apache_beam.io.parquetio import ReadFromParquet

        reads = [pbegin | f"Read{i}" >> ReadFromParquet(p, columns=self.COLUMNS)
                 for i, p in enumerate(self._patterns)]
        return reads | "Flatten" >> beam.Flatten()


class DedupDecisions(beam.PTransform):
    """Signatures (live and history) -> decisions for the live duplicates.

    The core of the stage, on slim tuples only: Sig -> (uid, (status, duplicate_of, error)).
    """

    def __init__(self, config: DedupConfig, rejected_path: Optional[str] = None):
        super().__init__()
        self._config, self._rejected_path = config, rejected_path
        bits = config.hash_size ** 2
        self._blocks = config.blocks or default_blocks(config.max_distance, bits)
        self._masks = key_masks(bits, self._blocks, config.max_distance) if config.near else None

    def expand(self, sigs):
        config = self._config
        exact_decisions = near = None
        if config.exact:
            exact = (metered_group(sigs | "KeyBySha" >> beam.Map(sha_keyed), "GroupBySha")
                     | "Exact" >> beam.ParDo(_ExactFn()).with_outputs("decisions", main="kept"))
            exact_decisions = exact.decisions
            sigs = exact.kept
        if config.near:
            near = sigs | "Near" >> _NearDecisions(config, self._masks, self._rejected_path)
        if exact_decisions is not None and near is not None:
            # An exact group's best image may itself be a near duplicate: its copies
            # then point at the cluster's representative, the image that is kept.
            exact_decisions = (metered_cogroup(
                {"exact": exact_decisions | "ByTarget" >> beam.Map(lambda d: (d[1][1], d)),
                 "near": near}, "JoinExactNear")
                | "Resolve" >> beam.FlatMap(resolve_exact))
        outputs = [pc for pc in (exact_decisions, near) if pc is not None]
        if not outputs:
            return sigs.pipeline | "NoDecisions" >> beam.Create([])
        return outputs | "Decisions" >> beam.Flatten()


class _NearDecisions(beam.PTransform):
    """Signatures -> duplicate_near decisions: candidates, verification, clusters.

    Nodes of the clustering are images (their ranks); the search hashes only
    find candidates, and every candidate pair of images is verified on their
    thumbnails before it becomes an edge.
    """

    def __init__(self, config: DedupConfig, masks: np.ndarray, rejected_path: Optional[str] = None):
        super().__init__()
        self._config, self._masks, self._rejected_path = config, masks, rejected_path

    def expand(self, sigs):
        config = self._config
        entries = sigs | "Entries" >> beam.FlatMap(near_entries_of)
        keyed = (entries
                 | "SearchHash" >> beam.Keys()
                 | "DistinctHash" >> beam.Distinct()
                 | "BucketKeys" >> beam.ParDo(_KeyBatchFn(self._masks, config.partitions,
                                                          config.key_batch)))
        candidates = (metered_group(keyed, "GroupByPartition")
                      | "CandidatePairs" >> beam.ParDo(_PairsFn(self._masks, config.max_distance,
                                                                config.max_bucket_comparisons)))
        both_ways = candidates | "PairsBothWays" >> beam.FlatMap(lambda p: [(p[0], p[1]), (p[1], p[0])])
        within = (metered_cogroup({"entries": entries, "pairs": both_ways}, "JoinEntries")
                  | "VerifyWithin" >> beam.ParDo(_VerifyFn(config, "within")).with_outputs(
                      "forward", "rejected", main="edges"))
        across = (metered_group(within.forward, "GroupCandidatePairs")
                  | "VerifyAcross" >> beam.ParDo(_VerifyFn(config, "across")).with_outputs(
                      "rejected", main="edges"))
        edges = (within.edges, across.edges) | "Edges" >> beam.Flatten()
        if self._rejected_path:
            from paircurate.transforms.write import write_json

            _ = ((within.rejected, across.rejected)
                 | "Rejected" >> beam.Flatten()
                 | "NearestRejected" >> beam.combiners.Top.Smallest(NEAREST_REJECTED)
                 | "WriteRejected" >> beam.Map(
                     lambda pairs, path: write_json(path, [list(p) for p in pairs]),
                     self._rejected_path))
        half_edges = edges | "BothWays" >> beam.FlatMap(
            lambda e: [(e[0], (e[1], e[2])), (e[1], (e[0], e[2]))])
        return (propagate_labels(half_edges, config.cluster_rounds)
                | "DecideNear" >> beam.FlatMapTuple(lambda node, s: near_decision(node, s[0], s[1])))


def propagate_labels(half_edges, rounds: int, namespace: str = _NS, prefix: str = ""):
    """(node, (neighbour, note)) for both ends of every edge -> (node, (label, nearest note)).

    The clustering that pHash and semantic dedup share: min-label propagation
    over ``rounds`` rounds (one GroupByKey each; only changed labels are
    re-sent).  Nodes are node_key() bytes, so a node's label is the best rank
    reachable from it: its cluster's representative.  A node's note is the
    smallest of its edges' notes (its nearest pair).  Applied in the caller's
    scope so the pHash stage keeps its step names; ``prefix`` names the steps
    and shuffle meters of another caller, ``namespace`` its metrics.
    """
    adjacency = metered_group(half_edges, f"{prefix}Adjacency")
    state = adjacency | f"{prefix}InitLabels" >> beam.FlatMap(_initial_state)
    for round_ in range(rounds):
        counter = "unconverged_nodes" if round_ == rounds - 1 else "label_changes"
        state = (metered_group(state | f"{prefix}Send{round_}" >> beam.FlatMap(_send),
                               f"{prefix}Gather{round_}")
                 | f"{prefix}Update{round_}" >> beam.ParDo(_UpdateFn(counter, namespace)))
    return state | f"{prefix}Labels" >> beam.MapTuple(lambda node, s: (node, (s[0], s[3])))


class HashImages(beam.PTransform):
    """records -> records with image_sha256, phash, low_information; original bytes dropped.

    The graph runs this before staging, while the original bytes are at hand;
    DeduplicateImages then keeps the signatures it finds (hash_record is a no-op
    for a record that has them and no bytes).
    """

    def __init__(self, config: DedupConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        if not self._config.enabled:
            return records | "DropRaw" >> beam.Map(_drop_raw)
        return records | "Hash" >> beam.ParDo(_HashFn(self._config))


class DeduplicateImages(beam.PTransform):
    """records -> records (same count): duplicate_exact / duplicate_near marked, signatures filled.

    ``history``: a PCollection of earlier ledger rows (dicts with uid, status,
    phash, image_sha256, low_information, near_signature); when None,
    ``config.history`` globs are read.  History rows with status ok always win
    and are never emitted.  ``rejected_path``: where to write the
    NEAREST_REJECTED candidate pairs that verification rejected, nearest first
    (JSON lists: verification distance, Hamming distance, signal, uid, uid).
    """

    def __init__(self, config: DedupConfig, history: Optional[beam.PCollection] = None,
                 rejected_path: Optional[str] = None):
        super().__init__()
        self._config = config
        self._history = history
        self._rejected_path = rejected_path
        if config.near and config.hash_size ** 2 > 64:
            raise ValueError("dedup.near needs hash_size <= 8 (hashes of at most 64 bits)")

    def expand(self, records):
        config = self._config
        if not config.enabled:
            return records | "DropRaw" >> beam.Map(_drop_raw)
        hashed = records | "Hash" >> beam.ParDo(_HashFn(config))
        live = hashed | "Live" >> beam.Filter(is_live)
        others = hashed | "NotLive" >> beam.Filter(lambda r: not is_live(r))
        sigs = live | "Signature" >> beam.Map(record_signature)
        history = self._history
        if history is None and config.history:
            history = records.pipeline | "ReadHistory" >> ReadHistory(config.history)
        if history is not None:
            history_sigs = (history
                            | "HistoryOk" >> beam.Filter(lambda r: r.get("status") == Status.OK.value)
                            | "HistorySignature" >> beam.Map(history_signature))
            sigs = (sigs, history_sigs) | "WithHistory" >> beam.Flatten()
        decisions = sigs | "Decide" >> DedupDecisions(config, self._rejected_path)
        # Records cross this shuffle packed, and slim: image bytes are in staging by now
        # (paircurate.graph stages them right after hashing).
        keyed = live | "KeyByUid" >> beam.Map(lambda r: (r["uid"], pack_record(decided_only(r))))
        joined = (metered_cogroup({"record": keyed, "decision": decisions}, "JoinDecisions")
                  | "Apply" >> beam.FlatMap(_join))
        return (joined, others) | "All" >> beam.Flatten()


def _drop_raw(record):
    if is_live(record):
        record["raw"] = None
    return record
