"""In-memory reference implementations the tests (and benchmarks/near_duplicate_quality.py) check
the pipeline's distributed dedup against: simple, slow and obviously right."""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from paircurate.transforms.phash import Rank, near_pairs


def choose_representative(ranks: Iterable[Rank]) -> Rank:
    """The cluster representative the pipeline picks: the smallest rank (phash.rank)."""
    return min(ranks)


def candidate_pairs(hashes: Sequence[int], max_distance: int, bits: int = 64,
                    blocks: Optional[int] = None, max_comparisons: Optional[int] = None
                    ) -> List[Tuple[int, int]]:
    """Index pairs (i < j) of ``hashes`` within max_distance (identical hashes collapsed first)."""
    values = np.asarray([int(h) for h in hashes], dtype=np.uint64)
    distinct, inverse = np.unique(values, return_inverse=True)
    members: Dict[int, List[int]] = {}
    for index, slot in enumerate(inverse.tolist()):
        members.setdefault(slot, []).append(index)
    pairs = set()
    for indices in members.values():  # identical hashes: distance 0
        pairs.update(itertools.combinations(indices, 2))
    value_pairs, _ = near_pairs(distinct, max_distance, bits, blocks, max_comparisons)
    slot_of = {int(v): s for s, v in enumerate(distinct.tolist())}
    for a, b in value_pairs.tolist():
        for i in members[slot_of[a]]:
            for j in members[slot_of[b]]:
                pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def connected_components(nodes: Iterable, edges: Iterable[Tuple]) -> Dict:
    """node -> smallest node of its component (union-find; the in-memory reference)."""
    parent = {node: node for node in nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {node: find(node) for node in parent}
