"""Exact and perceptual image dedup, within the run and against the ledgers of earlier runs.

The graph (every global step is a shuffle; nothing collects all hashes in one worker):

1. hash     live records -> image_sha256, phash, low_information; raw dropped.
2. slim     (uid, rank, sha256, phash, low) signatures; the records wait, keyed
            by uid, for the decisions (staged records, their details and
            bytes in staging, so only decided fields cross that join).
            History rows (status ok) join as signatures that always win.
3. exact    GroupByKey(sha256): the best-ranked signature survives, the others
            are duplicate_exact of it.
4. collapse survivors with information >= min_information: GroupByKey(phash) ->
            one node per distinct phash, ranked by its best member.  Identical
            hashes (degenerate images) are thus compared once, not pairwise.
5. pairs    bucket keys per node (phash.py: pigeonhole blocks), batched per
            worker into numpy arrays per partition -> GroupByKey(partition) ->
            verify inside each bucket -> each near pair once.
6. cluster  min-label propagation over the pairs, ``cluster_rounds`` rounds
            (one GroupByKey each; only changed labels are re-sent).  A node's
            label is the best rank reachable from it, so the cluster's
            representative is its best member: history first, then the largest
            original pixel count, then the smallest uid -- a total order, so
            the choice does not depend on element order or runner.  Clusters of
            diameter <= cluster_rounds converge exactly; beyond that a node may
            point at a better node that itself points further (duplicate_of
            chains that end at a kept image; metric dedup/unconverged_nodes).
7. decide   members joined with their node's label -> duplicate_near; all
            decisions joined back to the records by uid.

Defaults, measured by benchmarks/near_duplicate_quality.py (2,000 generated
structured images + 200 nearly flat ones, 14 transformed copies each):

* max_distance = 6.  pHash sets (almost always) exactly half of its 64 bits (coefficient >
  median), so distances are even and k=7 behaves like k=6.  At k=6 a copy is
  within k of its original for >= 96.6% of JPEG q30-95, resizes 0.25x-2x,
  brightness +-15% and greyscale copies; small text overlays 75%, crops of
  5% 44% and of 10% 5% (pHash is not crop-robust); horizontal flips 0% (the
  DCT's odd columns change sign: pHash cannot catch flips).  k=8 would add
  crop-5% (65%) and text (81%) but doubles the structured families falsely
  merged (3.1% -> 6.3% of 2,000 families, a share that grows with the set).
* min_information = 4.0 grey levels.  Below it: 72% of the flat images,
  4.2% of the structured ones.  At k=6 it cuts families falsely merged from
  8.2% to 4.6% (distinct base images merged: 0.95% -> 0.36%) for 3.7 points
  of near-duplicate recall (copies of low-information images are then only
  caught when exact).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from paircurate.beam_util import metered_cogroup, metered_group
from paircurate.config import DedupConfig
from paircurate.schema import Status, is_live, mark, pack_record, unpack_record
from paircurate.transforms.staging import decided_only
from paircurate.transforms.phash import (Rank, bucket_entries, bucket_pairs, bucket_partition,
                                         default_blocks, hamming, hash_hex, hash_int, key_masks,
                                         rank, signature)

_NS = "dedup"

#: (uid, rank, image_sha256 or None, phash int or None, low_information)
Sig = Tuple[str, Rank, Optional[str], Optional[int], bool]
#: (uid, (status, duplicate_of, error))
Decision = Tuple[str, Tuple[str, str, str]]


# --------------------------------------------------------------------------- pure record steps

def hash_record(record: Dict[str, Any], config: DedupConfig) -> Dict[str, Any]:
    """Fill image_sha256, phash, low_information of a live record and drop its raw bytes.

    Hashes the original (``raw``); falls back to the resized ``image`` when raw
    is gone.  A record that already carries image_sha256 (slim records,
    re-runs) keeps its signatures.
    """
    if not is_live(record):
        return record
    data = record.get("raw") or record.get("image")
    if data:
        try:
            sig = signature(data, config.hash, config.hash_size)
        except Exception as exc:  # the resize stage decoded it, so this is rare
            return mark(record, Status.DECODE_FAILED, f"corrupt: {type(exc).__name__}")
        record["image_sha256"] = sig.sha256
        record["phash"] = hash_hex(sig.phash, config.hash_size ** 2)
        record["low_information"] = sig.information < config.min_information
    elif record.get("image_sha256") is None:
        return mark(record, Status.DECODE_FAILED, "no_image")
    if record.get("low_information") is None:
        record["low_information"] = False
    record["raw"] = None
    return record


def record_signature(record: Dict[str, Any]) -> Sig:
    phash = record.get("phash")
    return (record["uid"],
            rank(record["uid"], record.get("original_width"), record.get("original_height")),
            record.get("image_sha256"), hash_int(phash) if phash else None,
            bool(record.get("low_information")))


def history_signature(row: Dict[str, Any]) -> Sig:
    phash = row.get("phash")
    return (row["uid"], rank(row["uid"], 0, 0, history=True), row.get("image_sha256"),
            hash_int(phash) if phash else None, bool(row.get("low_information")))


def apply_decisions(record: Dict[str, Any], decisions: List[Tuple[str, str, str]]) -> Dict[str, Any]:
    """Mark a record with its (single) decision; a record without one is kept."""
    if decisions:
        status, duplicate_of, error = min(decisions)
        mark(record, Status(status), error)
        record["duplicate_of"] = duplicate_of  # after mark(), which leaves it alone
    return record


def sha_keyed(sig: Sig) -> Tuple[bytes, Sig]:
    """(sha256 as bytes, the signature without it): the exact step's shuffle carries the digest once."""
    uid, rank_, sha, phash, low = sig
    try:
        key = bytes.fromhex(sha) if sha else b""
    except ValueError:  # not hex (a hand-made history ledger): the text itself is the key
        key = sha.encode("utf-8")
    return key, (uid, rank_, None, phash, low)


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
    from paircurate.transforms.phash import candidate_pairs

    eligible = [s for s in sigs if s[3] is not None and not s[4]]
    pairs = candidate_pairs([s[3] for s in eligible], config.max_distance, config.hash_size ** 2,
                            config.blocks or None, config.max_bucket_comparisons)
    return [(eligible[i][0], eligible[j][0]) for i, j in pairs]


def near_decisions(phash: int, label: Tuple[Rank, int], member_ranks: Iterable[Rank]
                   ) -> List[Decision]:
    """duplicate_near for every live member of a node except the cluster's representative."""
    best_rank, best_phash = label
    distance = hamming(phash, best_phash)
    return [(r[2], (Status.DUPLICATE_NEAR.value, best_rank[2], f"near: distance={distance}"))
            for r in member_ranks if r != best_rank]


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


def _initial_state(element):
    node, grouped = element
    if grouped["adj"] and grouped["rank"]:
        neighbours = sorted(set(v for vs in grouped["adj"] for v in vs))
        yield node, ((grouped["rank"][0], node), neighbours, True)


def _send(element):
    node, (label, neighbours, changed) = element
    yield node, (0, label, neighbours)
    if changed:
        for other in neighbours:
            yield other, (1, label, None)


class _UpdateFn(beam.DoFn):
    def __init__(self, counter: str):
        self._changed = Metrics.counter(_NS, counter)

    def process(self, element):
        node, messages = element
        own, neighbours, best = None, None, None
        for kind, label, nbrs in messages:
            if kind == 0:
                own, neighbours = label, nbrs
            if best is None or label < best:
                best = label
        changed = best != own
        if changed:
            self._changed.inc()
        yield node, (best, neighbours, changed)


def _decide_near(element):
    phash, grouped = element
    if not grouped["member"]:
        return
    label = grouped["label"][0] if grouped["label"] else (min(grouped["rank"]), phash)
    yield from near_decisions(phash, label, grouped["member"])


def _join(element):
    _, grouped = element
    decisions = list(grouped["decision"])
    for packed in grouped["record"]:
        yield apply_decisions(unpack_record(packed), decisions)


# --------------------------------------------------------------------------- PTransforms

class ReadHistory(beam.PTransform):
    """Signatures of the ok rows of earlier ledgers (Parquet paths or globs)."""

    COLUMNS = ["uid", "status", "phash", "image_sha256", "low_information"]

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

    def __init__(self, config: DedupConfig):
        super().__init__()
        self._config = config
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
            near = sigs | "Near" >> _NearDecisions(config, self._masks)
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
    def __init__(self, config: DedupConfig, masks: np.ndarray):
        super().__init__()
        self._config, self._masks = config, masks

    def expand(self, sigs):
        config = self._config
        by_phash = (sigs
                    | "Eligible" >> beam.Filter(lambda s: s[3] is not None and not s[4])
                    | "KeyByPhash" >> beam.Map(lambda s: (s[3], s[1])))
        members = by_phash | "LiveMembers" >> beam.Filter(lambda kv: kv[1][0] == 1)
        # One node per distinct phash, ranked by its best member (combiner: hot hashes are cheap).
        nodes = by_phash | "NodeRank" >> beam.CombinePerKey(min)
        keyed = (nodes
                 | "NodeHash" >> beam.Keys()
                 | "BucketKeys" >> beam.ParDo(_KeyBatchFn(self._masks, config.partitions,
                                                          config.key_batch)))
        edges = (metered_group(keyed, "GroupByPartition")
                 | "VerifyPairs" >> beam.ParDo(_PairsFn(self._masks, config.max_distance,
                                                        config.max_bucket_comparisons)))
        adjacency = metered_group(
            edges | "BothWays" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[0])]), "Adjacency")
        state = (metered_cogroup({"adj": adjacency, "rank": nodes}, "JoinRanks")
                 | "InitLabels" >> beam.FlatMap(_initial_state))
        for round_ in range(config.cluster_rounds):
            counter = "unconverged_nodes" if round_ == config.cluster_rounds - 1 else "label_changes"
            state = (metered_group(state | f"Send{round_}" >> beam.FlatMap(_send), f"Gather{round_}")
                     | f"Update{round_}" >> beam.ParDo(_UpdateFn(counter)))
        labels = state | "Labels" >> beam.MapTuple(lambda node, s: (node, s[0]))
        return (metered_cogroup({"member": members, "rank": nodes, "label": labels}, "JoinLabels")
                | "DecideNear" >> beam.FlatMap(_decide_near))


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
    phash, image_sha256, low_information); when None, ``config.history``
    globs are read.  History rows with status ok always win and are never emitted.
    """

    def __init__(self, config: DedupConfig, history: Optional[beam.PCollection] = None):
        super().__init__()
        self._config = config
        self._history = history
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
        decisions = sigs | "Decide" >> DedupDecisions(config)
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
