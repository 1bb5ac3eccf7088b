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
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from paircurate.transforms.beam_util import BatchedFn, metered_cogroup, metered_group
from paircurate.transforms.phash import (
    LOW_CONTRAST,
    MIRRORED,
    SMOOTH,
    Rank,
    bucket_pairs,
    default_blocks,
    hamming,
    hash_hex,
    hash_int,
    key_masks,
    partitioned_entries,
    rank,
    signature,
    split_entries,
    verify_distance,
)
from paircurate.transforms.schema import Status, is_live, mark, pack_record, unpack_record
from paircurate.transforms.settings import AT_LEAST_ONE, NON_NEGATIVE, Bounds, ConfigError, setting
from paircurate.transforms.staging import decided_only


@dataclass
class SemanticDedupConfig:
    """dedup.semantic: duplicates by CLIP image embedding, after the CLIP stage (transforms/semantic.py,
    which imports this module: the section lives here, nested in dedup's)."""
    enabled: bool = False
    # Pairs at or above this cosine similarity of their image embeddings are duplicates
    # (SemDeDup thresholds the cosine distance 1 - cos with epsilon: 0.95 is epsilon 0.05).
    min_cosine: float = setting(0.95, Bounds(-1, 1))  # a cosine similarity
    # Random-hyperplane LSH: bands of ``bits`` sign bits each; a pair that agrees on every
    # bit of one band is a candidate.  30 x 16 measured recall 0.998 at cosine 0.95-0.955
    # (benchmarks/semantic_recall.py; README, Semantic duplicates).
    bands: int = setting(30, Bounds(1, 255))  # the band index is one byte
    bits: int = setting(16, Bounds(8, 64))    # whole bytes, checked below
    # Seed of the hyperplanes (every worker draws the same ones).
    seed: int = setting(0, NON_NEGATIVE)
    # Upper bound on comparisons inside one band bucket; over it a sliding window (metric
    # semantic/bucket_overflows), as the pHash stage does.
    max_bucket_comparisons: int = setting(200_000, AT_LEAST_ONE)

    def check(self) -> None:
        if self.bits % 8:
            raise ConfigError(f"dedup.semantic.bits={self.bits}: must be a multiple of 8 (whole bytes)")


@dataclass
class DedupConfig:
    enabled: bool = True
    exact: bool = True
    near: bool = True
    # imagehash function: phash | dhash | ahash | whash
    hash: str = setting("phash", choices=("phash", "dhash", "ahash", "whash"))
    hash_size: int = setting(8, Bounds(2, 32))  # imagehash needs 2+; near search 8 at most
    max_distance: int = setting(6, NON_NEGATIVE)  # at most the hash's bits, checked below
    # Images whose information measure is below this (fog, haze, gradient skies) are near
    # duplicates only under the strict low-contrast verification (phash.verify_distance).
    min_information: float = setting(1.5, Bounds(0))
    # Below this information the near search hashes with phash.smooth_hash, not the pHash.
    smooth_below: float = setting(4.0, Bounds(0))
    # Mirrored copies are near duplicates (canonical orientation; see phash.near_entries).
    flips: bool = True
    # Verify every candidate pair on the images' thumbnails (phash.verify_distance) and keep
    # it only at verify_max_distance or less (1.0: the measured tolerances).
    verify: bool = True
    verify_max_distance: float = setting(1.0, Bounds(0))
    # Ledgers of earlier runs (paths or globs); their ok samples always win.
    history: List[str] = field(default_factory=list)
    # Upper bound on pairwise comparisons inside one candidate bucket; a bucket
    # over it is compared in a window (see transforms/phash.py; metric dedup/bucket_overflows).
    max_bucket_comparisons: int = setting(200_000, AT_LEAST_ONE)
    # Pigeonhole blocks m per hash for candidate keys (0: max_distance + 3, i.e. keys of
    # three blocks; see transforms/phash.py for the sizing at a billion images).
    blocks: int = setting(0, NON_NEGATIVE)  # 0: automatic; else above max_distance
    # Shuffle partitions the candidate buckets are spread over (batches of buckets, so
    # the shuffle carries numpy arrays, not one element per key).  Per partition in
    # memory: items * keys / partitions entries of 9 bytes; raise it beyond ~1e9 items.
    partitions: int = setting(4096, AT_LEAST_ONE)
    # Distinct hashes per worker batch when the bucket keys are computed.  A batch holds
    # about 1 KB a hash while its keys are sorted into partitions (phash.partitioned_entries);
    # each batch adds up to one shuffle element per partition (a dozen bytes of framing).
    key_batch: int = setting(16384, AT_LEAST_ONE)
    # Rounds of min-label propagation over near-duplicate pairs; clusters of diameter
    # up to this are exact (metric dedup/unconverged_nodes counts the rest).
    cluster_rounds: int = setting(8, AT_LEAST_ONE)
    # Semantic duplicates by CLIP image embedding (off unless enabled; needs the CLIP stage).
    semantic: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)

    def check(self) -> None:
        if self.near and self.hash_size > 8:
            raise ConfigError("dedup.hash_size must be at most 8 (64-bit hashes) for near-duplicate search")
        bits = self.hash_size ** 2
        if not 0 <= self.max_distance <= bits:
            raise ConfigError(f"dedup.max_distance must be between 0 and the hash's bit count ({bits})")
        if self.blocks and not self.max_distance < self.blocks <= bits:
            raise ConfigError(f"dedup.blocks must be 0 (automatic) or above dedup.max_distance "
                              f"({self.max_distance}) and at most the hash's bit count ({bits})")


_NS = "dedup"

# Signatures and entries cross shuffles as plain tuples (Beam's coder would pickle a
# NamedTuple, class name included, in every element); code that reads their fields
# names them first: Sig(*element), Entry(*element).


class Sig(NamedTuple):
    """An image's dedup signature."""

    uid: str
    rank: Rank
    image_sha256: Optional[str]
    phash: Optional[int]
    low_information: bool
    #: phash.near_entries() bytes (b"" for flat images; None when unknown, e.g. a ledger from
    #: before near_signature: then the pHash is the entry, unverified).
    near: Optional[bytes]


class Entry(NamedTuple):
    """One entry of the near search, keyed by its search hash."""

    node: bytes       # node_key(rank): the image
    flags: int        # phash.MIRRORED, phash.SMOOTH
    thumbnail: bytes  # for verification (b"": none, the pair is not verified)


class EdgeNote(NamedTuple):
    """Why two images are near duplicates, and how near."""

    why: str          # "phash" | "smooth" | "flip"
    distance: int     # Hamming distance of the search hashes
    verify: float     # verification distance of the thumbnails


#: (uid, (status, duplicate_of, error))
Decision = Tuple[str, Tuple[str, str, str]]


def is_history(rank_: Rank) -> bool:
    """A signature from an earlier run's ledger (phash.rank puts those first)."""
    return rank_[0] == 0


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
    return Sig(record["uid"],
               rank(record["uid"], record.get("original_width"), record.get("original_height")),
               record.get("image_sha256"), hash_int(phash) if phash else None,
               bool(record.get("low_information")), _near_bytes(record.get("near_signature")))


def history_signature(row: Dict[str, Any]) -> Sig:
    phash = row.get("phash")
    return Sig(row["uid"], rank(row["uid"], 0, 0, history=True), row.get("image_sha256"),
               hash_int(phash) if phash else None, bool(row.get("low_information")),
               _near_bytes(row.get("near_signature")))


def plain(value: tuple) -> tuple:
    """A NamedTuple as the plain tuple it crosses shuffles as."""
    return tuple(value)


def near_entries_of(sig: tuple) -> List[Tuple[int, tuple]]:
    """(search hash, (node_key(rank), flags, thumbnail)) for each entry of a signature.

    Low-information images have entries flagged LOW_CONTRAST (verified by the
    strict rule); in ledgers from before that rule they have none.  A
    signature without near_signature (an older ledger, hand-made records) has
    its pHash as its one entry, without a thumbnail: its pairs are not verified.
    """
    sig = Sig(*sig)
    if sig.low_information and not sig.near:
        return []
    node = node_key(sig.rank)
    if sig.near is None:
        return [(sig.phash, (node, 0, b""))] if sig.phash is not None else []
    return [(search, (node, flags, thumb)) for flags, search, thumb in split_entries(sig.near)]


def edge_note(a: Entry, b: Entry, search_a: int, search_b: int) -> EdgeNote:
    """Why two entries are near duplicates (the signal that found them) and how near they are."""
    if (a.flags ^ b.flags) & MIRRORED:
        why = "flip"
    elif (a.flags | b.flags) & SMOOTH:
        why = "smooth"
    else:
        why = "phash"
    low_contrast = bool((a.flags | b.flags) & LOW_CONTRAST)
    distance = verify_distance(a.thumbnail, b.thumbnail, low_contrast) if a.thumbnail and b.thumbnail else 0.0
    return EdgeNote(why, hamming(search_a, search_b), round(distance, 3))


def verified_edges(group_a: Iterable[tuple], group_b: Optional[Iterable[tuple]], search_a: int,
                   search_b: int, config: DedupConfig, max_comparisons: Optional[int] = None,
                   with_nodes: bool = False) -> Tuple[List[Tuple[bytes, bytes, EdgeNote]], List]:
    """Verified pairs between two groups of entries (or within one, when group_b is None).

    Returns (accepted (node, node, note) edges, the rejected pairs' notes, or
    with ``with_nodes`` their (node, node, note)).
    Entries of one image (both orientations) never pair with each other.
    ``max_comparisons`` bounds the pairs looked at (like a hot bucket's window).
    """
    # A fixed order: the bounded window below must not depend on the runner.
    a = sorted(Entry(*entry) for entry in group_a)
    pairs = (itertools.combinations(a, 2) if group_b is None
             else itertools.product(a, sorted(Entry(*entry) for entry in group_b)))
    if max_comparisons is not None:
        pairs = itertools.islice(pairs, max_comparisons)
    accepted, rejected = [], []
    for x, y in pairs:
        if x.node == y.node:
            continue
        note = edge_note(x, y, search_a, search_b)
        if not config.verify or note.verify <= config.verify_max_distance:
            accepted.append((min(x.node, y.node), max(x.node, y.node), note))
        else:
            rejected.append((x.node, y.node, note) if with_nodes else note)
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


def _sig_coder():
    from apache_beam.coders import FastPrimitivesCoder  # the coder the shuffle would use anyway

    return FastPrimitivesCoder()


_SIG_CODER = _sig_coder()


def sha_keyed(sig: tuple) -> Tuple[bytes, bytes]:
    """(sha256 as bytes, the signature without it, packed): the exact step's shuffle element.

    The digest crosses once, as the key.  The signature crosses as one bytes
    object: a local runner keeps a grouping table's values decoded until the
    consumer runs, and a packed signature costs one object there, not a dozen.
    """
    sig = Sig(*sig)
    sha = sig.image_sha256
    try:
        key = bytes.fromhex(sha) if sha else b""
    except ValueError:  # not hex (a hand-made history ledger): the text itself is the key
        key = sha.encode("utf-8")
    return key, _SIG_CODER.encode(plain(sig._replace(image_sha256=None)))


class PackedSigs:
    """A grouped iterable of packed signatures, unpacked lazily on each pass (exact_group makes two)."""

    def __init__(self, packed: Iterable[bytes]):
        self._packed = packed

    def __iter__(self) -> Iterator[tuple]:
        return (_SIG_CODER.decode(p) for p in self._packed)


def exact_group(sigs: Iterable[tuple]) -> Tuple[tuple, Iterable[Decision]]:
    """The best signature of one sha256 group, and duplicate_exact for the live others.

    ``sigs`` is iterated twice (a GroupByKey result may be, and is not held in memory).
    """
    best = min((Sig(*s) for s in sigs), key=lambda s: s.rank)
    decisions = ((s.uid, (Status.DUPLICATE_EXACT.value, best.uid, "exact"))
                 for s in (Sig(*s) for s in sigs) if s.rank != best.rank and not is_history(s.rank))
    return plain(best), decisions


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
    return EdgeNote(_WHY[packed & 3], (packed >> 2) & 255, (packed >> 10) / 1000)


def near_decision(node: bytes, label: bytes, note: int) -> List[Decision]:
    """duplicate_near for a live image whose cluster's representative is another one.

    The error names the signal of the image's nearest verified pair and its
    distances: ``near: phash distance=4 verify=0.31`` (``smooth``, ``flip``).
    """
    if label == node or node[0] != 1:  # the representative, or an image of an earlier run
        return []
    why, distance, verify = unpack_note(note)
    return [(node_uid(node), (Status.DUPLICATE_NEAR.value, node_uid(label),
                              f"near: {why} distance={distance} verify={verify:.2f}"))]


# The Beam-facing helpers below carry no type hints on purpose: Beam would take them for the
# element types and encode those PCollections with typed coders instead of the
# FastPrimitivesCoder the stage's other shuffles use (the bytes shuffled would change).

def _keyed_by_target(decision):
    _uid, (_status, duplicate_of, _error) = decision
    return duplicate_of, decision


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
        _, packed = element
        best, decisions = exact_group(PackedSigs(packed))
        yield best
        for decision in decisions:
            self._dups.inc()
            yield beam.pvalue.TaggedOutput("decisions", decision)


class _KeyBatchFn(BatchedFn):
    """Distinct hashes -> (partition, (key indices, hashes)) arrays, one element per partition and batch."""

    def __init__(self, masks: np.ndarray, partitions: int, batch: int):
        super().__init__(batch)
        self._masks, self._partitions = masks, partitions

    def emit_batch(self, phashes: List[int]):
        hashes = np.array(phashes, dtype=np.uint64)
        del phashes  # the Python ints: the array is all that is needed from here
        # Raw bytes, not arrays: the shuffle then carries 9 bytes per entry, not a pickle per element.
        for part, keys, values in partitioned_entries(hashes, self._masks, self._partitions):
            yield part, (keys, values)


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
            self._nearest.update(int(note.verify * 1000))
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


def _label_and_note(node, state):  # no type hints: see _keyed_by_target
    label, _neighbours, _changed, note = state
    return node, (label, note)


def _decide_near(node, labelled):  # no type hints: see _keyed_by_target
    label, note = labelled
    return near_decision(node, label, note)


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
                {"exact": exact_decisions | "ByTarget" >> beam.Map(_keyed_by_target),
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
            from paircurate.transforms.files import write_json

            _ = ((within.rejected, across.rejected)
                 | "Rejected" >> beam.Flatten()
                 | "NearestRejected" >> beam.combiners.Top.Smallest(NEAREST_REJECTED)
                 | "WriteRejected" >> beam.Map(
                     lambda pairs, path: write_json(path, [list(p) for p in pairs]),
                     self._rejected_path))
        half_edges = edges | "BothWays" >> beam.FlatMap(
            lambda e: [(e[0], (e[1], e[2])), (e[1], (e[0], e[2]))])
        return (propagate_labels(half_edges, config.cluster_rounds)
                | "DecideNear" >> beam.FlatMapTuple(_decide_near))


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
    return state | f"{prefix}Labels" >> beam.MapTuple(_label_and_note)


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
        sigs = live | "Signature" >> beam.Map(lambda r: plain(record_signature(r)))
        history = self._history
        if history is None and config.history:
            history = records.pipeline | "ReadHistory" >> ReadHistory(config.history)
        if history is not None:
            history_sigs = (history
                            | "HistoryOk" >> beam.Filter(lambda r: r.get("status") == Status.OK.value)
                            | "HistorySignature" >> beam.Map(lambda r: plain(history_signature(r))))
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
