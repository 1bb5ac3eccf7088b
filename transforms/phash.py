"""Image signatures and the pure near-duplicate machinery behind transforms/dedup.py.

Signatures
    * ``content_sha256``: sha256 of the *decoded pixels of the original* (mode
      normalised to RGB/RGBA, size in the digest).  Not of the downloaded bytes
      (a PNG saved at another compression level, or with other metadata, has
      other bytes but the same picture) and not of the resized encoding (that
      depends on image.* settings and on encoder versions, so it would stop
      matching the ledgers of earlier runs as soon as image_size changed).
    * ``perceptual_hash``: imagehash (pHash by default) of the original, as an
      int; stored in the ledger as fixed-width hex (16 chars for 64 bits).
    * ``information``: how much of the pHash is signal.  The median magnitude
      of the 63 lowest-frequency AC coefficients of the orthonormal DCT of the
      32x32 greyscale thumbnail pHash itself looks at, in grey levels.  Flat
      images, sky and smooth gradients put their energy in a handful of
      coefficients (a linear ramp: only the first row and column), so the
      median is near zero and pHash's bits (coefficient > median) are decided
      by noise and JPEG artefacts: such hashes collide across unrelated
      images.  Below DedupConfig.smooth_below the near search uses
      ``smooth_hash`` instead; below DedupConfig.min_information (fog, haze,
      gradient skies) their pairs are verified by a stricter rule
      (``verify_distance(low_contrast=True)``), and images without luma
      structure in their thumbnail (truly flat) are near duplicates of
      nothing.  Both thresholds come from
      benchmarks/near_duplicate_quality.py --photographs.
    * ``near_entries``: what the near search compares, a few dozen bytes per
      entry: (flags, search hash, 44-byte thumbnail), in the image's canonical
      orientation (flips).  Candidates come from the search hashes; every
      candidate pair is then verified on the thumbnails (``verify_distance``).

Candidate pairs (exact recall, no all-pairs)
    Two b-bit hashes within Hamming distance k, cut into m blocks, differ in at
    most k blocks, so they agree exactly on at least m-k blocks (pigeonhole).
    A *key* is one choice of t = m-k blocks: the hash masked to those blocks.
    Every pair within k shares at least one of the C(m, t) keys, so grouping
    by key and verifying inside each group finds all of them.  m = k+1 (t=1)
    gives k+1 keys of ~b/(k+1) bits: 9-bit buckets at k=6, which at 10^9
    images hold ~2M hashes each (10^12 comparisons per bucket).  Larger t
    widens the key (b*t/m bits) at the cost of more keys per image:

        k=6   t=2: 28 keys x 16 bits  -> ~15k per bucket at 1e9 (too hot)
              t=3: 84 keys x 21 bits  -> ~400 per bucket, ~34k checks/image
              t=4: 210 keys x 26 bits -> ~20 per bucket, but 2.5x the shuffle
    The default (``default_blocks``) is t=3: buckets of a few hundred at a
    billion uniformly spread hashes, 84 shuffle entries of 9 bytes per
    distinct hash (batched, see dedup.py), and ~10^4 XOR+popcount per image,
    which numpy does in microseconds.  ``blocks`` in the config overrides it.

    Each pair is reported once, from the first key (in a fixed order) on
    which the two hashes agree; other buckets that also see it drop it, so
    no global distinct is needed.

Hot buckets
    Identical hashes are collapsed before this stage (one node per distinct
    hash).  A bucket whose all-pairs count exceeds ``max_comparisons`` is
    compared in a window instead: sorted by the full hash, each hash is
    compared with the next ``max_comparisons // size`` hashes.  Pairs inside
    such a bucket that are further apart in that order (and whose first
    shared key is this bucket) are missed; ``BucketStats.skipped`` counts
    the comparisons not made, so the recall loss is visible in metrics.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

ImageLike = Union[bytes, bytearray, "Image.Image"]  # noqa: F821 (PIL imported lazily)

#: Side of the greyscale thumbnail pHash (hash_size 8) and ``information`` look at.
THUMB = 32


# --------------------------------------------------------------------------- signatures

def open_image(data: ImageLike):
    """A decoded PIL image from bytes (or the image itself)."""
    from PIL import Image

    if isinstance(data, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
        return image
    return data


def _normalised(image):
    """RGB, or RGBA where the image carries transparency (so L/P/RGB of equal pixels agree)."""
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    mode = "RGBA" if has_alpha else "RGB"
    return image if image.mode == mode else image.convert(mode)


def content_sha256(data: ImageLike) -> str:
    """sha256 (hex) of the decoded pixels: equal for byte-different encodings of one picture."""
    image = _normalised(open_image(data))
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _hash_function(name: str):
    import imagehash

    functions = {"phash": imagehash.phash, "dhash": imagehash.dhash,
                 "ahash": imagehash.average_hash, "whash": imagehash.whash}
    if name not in functions:
        raise ValueError(f"unknown hash {name!r}; valid: " + ", ".join(functions))
    return functions[name]


def perceptual_hash(data: ImageLike, hash_name: str = "phash", hash_size: int = 8) -> int:
    """The imagehash perceptual hash of an image as an int (bit i = flattened bit i, MSB first)."""
    bits = _hash_function(hash_name)(open_image(data), hash_size=hash_size).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_hex(value: int, bits: int = 64) -> str:
    """Fixed-width hex of a hash (16 chars for 64 bits)."""
    return format(value, "0{}x".format((bits + 3) // 4))


def hash_int(text: str) -> int:
    return int(text, 16)


def information(data: ImageLike) -> float:
    """Median |low-frequency AC DCT coefficient| of the 32x32 grey thumbnail, in grey levels."""
    from PIL import Image
    from scipy.fft import dctn

    thumb = open_image(data).convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    coefficients = dctn(np.asarray(thumb, dtype=np.float64), norm="ortho")[:8, :8].flatten()
    return float(np.median(np.abs(coefficients[1:])))


@dataclass(frozen=True)
class Signature:
    sha256: str
    phash: int
    information: float
    #: near_entries(): the near-duplicate search's entries.
    near: bytes = b""


def signature(data: ImageLike, hash_name: str = "phash", hash_size: int = 8,
              min_information: float = 0.0, smooth_below: float = 0.0,
              flips: bool = False) -> Signature:
    """Decode once, compute all signatures."""
    image = open_image(data)
    info = information(image)
    near = near_entries(image, hash_name, hash_size, search_kinds(info, smooth_below), flips,
                        low_contrast=info < min_information)
    return Signature(content_sha256(image), perceptual_hash(image, hash_name, hash_size), info, near)


def search_kinds(info: float, smooth_below: float) -> List[bool]:
    """Which search hashes an image gets: [False] the pHash, [True] the smooth hash, or both.

    Both within SMOOTH_BAND of smooth_below, so that a copy whose information
    crosses the threshold (a contrast change, a re-encode) still meets its original.
    """
    kinds = []
    if info >= smooth_below / SMOOTH_BAND:
        kinds.append(False)
    if info < smooth_below * SMOOTH_BAND:
        kinds.append(True)
    return kinds


# --------------------------------------------------------------------------- verification

#: Side of the luma thumbnail the verification compares; chroma is 2x2 (Cb, Cr).
VERIFY_SIDE = 6
#: One entry: flags (1 byte), search hash (8), luma VERIFY_SIDE^2 (36), chroma 2x2x2 (8).
ENTRY_BYTES = 1 + 8 + VERIFY_SIDE ** 2 + 8
#: Entry flags: the entry describes the mirrored image; its search hash is the smooth hash;
#: the image has low information (its pairs are verified with verify_distance(low_contrast=True)).
MIRRORED, SMOOTH, LOW_CONTRAST = 1, 2, 4
#: |horizontal balance| under which an image's orientation is ambiguous (both orientations are entries).
FLIP_MARGIN = 0.2
#: Images with information within this factor of dedup.smooth_below get both search hashes.
SMOOTH_BAND = 1.5

# Tolerances of verify_distance (each component is 1.0 at its tolerance).
MIN_CORRELATION = 0.97     # luma structure (6x6, mean and spread removed)
LEVEL_RATIO = 1.18         # mean luma (brightness +-12%, contrast)
SPREAD_RATIO = 1.35        # luma standard deviation (contrast +-20%)
CHROMA_TOLERANCE = 8.0     # RMS difference of the 2x2 Cb/Cr grid, in levels, after scaling
CHROMA_SCALE = 1.4         # chroma scale allowed (brightness and contrast scale it)
FLAT_SPREAD = 2.0          # luma spread under which the structure is noise: levels must agree
GREY = 3.0                 # chroma RMS under which an image counts as greyscale
GREY_LUMA_RATIO = 1.05     # greyscale vs colour: luma level and spread within 5%
GREY_MIN_CORRELATION = 0.99  # and luma structure correlated at least this well
# The low-contrast rule (pairs with a low-information image), in grey levels of the thumbnail:
# distinct crops of one fog or gradient sky differ by little more than brightness and contrast
# copies do, so what is left after fitting one to the other must be (nearly) nothing.
LOW_RESIDUAL = 0.7         # luma left over after the best affine fit (RMS; 0.6 misses real copies)
LOW_CHROMA = 1.0           # 2x2 Cb/Cr difference after the best scale (RMS)
#: Verification distance of a pair that cannot be verified (no luma structure under the strict rule).
UNVERIFIABLE = 99.0


def _grey32(image) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS),
                      dtype=np.float64)


def _projections() -> np.ndarray:
    """64 fixed +-1 projections of the 63 AC coefficients (from blake2b: the same everywhere)."""
    raw = hashlib.blake2b(b"paircurate smooth hash", digest_size=64).digest()
    stream = b"".join(hashlib.blake2b(raw + bytes([i]), digest_size=64).digest() for i in range(16))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:63 * 64]
    return np.where(bits.reshape(63, 64), 1.0, -1.0)


_PROJECTIONS = None


def smooth_hash(grey32: np.ndarray) -> int:
    """64-bit SimHash of the 63 lowest AC DCT coefficients of the 32x32 grey thumbnail.

    pHash sets bit i when coefficient i is above the median: for a smooth
    image most coefficients are near zero, so those bits follow JPEG noise.
    Each SimHash bit is the sign of a fixed +-1 mix of all 63 coefficients,
    dominated by the few strong ones, so it holds for re-encodes of a sky;
    and a sign is unchanged by brightness and contrast (the DC term is left out).
    """
    global _PROJECTIONS
    from scipy.fft import dctn

    if _PROJECTIONS is None:
        _PROJECTIONS = _projections()
    ac = dctn(grey32, norm="ortho")[:8, :8].flatten()[1:]
    bits = (ac @ _PROJECTIONS) > 0
    return int("".join("1" if b else "0" for b in bits), 2)


def horizontal_balance(grey32: np.ndarray) -> float:
    """The first horizontal DCT coefficient over the AC RMS: its sign says which side is brighter."""
    from scipy.fft import dctn

    low = dctn(grey32, norm="ortho")[:8, :8].flatten()
    rms = float(np.sqrt(np.mean(low[1:] ** 2)))
    return float(low[1] / rms) if rms > 1e-9 else 0.0


def thumbnail(image) -> bytes:
    """VERIFY_SIDE^2 luma bytes, then 2x2 Cb and Cr as bytes (128 = no colour): 44 bytes."""
    from PIL import Image

    ycc = image.convert("RGB").convert("YCbCr")
    luma = ycc.getchannel(0).resize((VERIFY_SIDE, VERIFY_SIDE), Image.Resampling.BOX)
    chroma = ycc.resize((2, 2), Image.Resampling.BOX)
    return (bytes(luma.getdata()) + bytes(chroma.getchannel(1).getdata())
            + bytes(chroma.getchannel(2).getdata()))


def near_entries(data: ImageLike, hash_name: str = "phash", hash_size: int = 8,
                 kinds: Sequence[bool] = (False,), flips: bool = True, low_contrast: bool = False) -> bytes:
    """The image's entries for the near-duplicate search, ENTRY_BYTES each.

    An entry is (flags, search hash, thumbnail).  The search hash is the
    perceptual hash (kind False), or smooth_hash() (kind True; images under
    dedup.smooth_below, see search_kinds).
    With flips the image is first put in its canonical orientation (the
    brighter side left; horizontal_balance), so a mirrored copy has the same
    entry as its original; an image whose balance is within FLIP_MARGIN of
    zero gets an entry for each orientation, so a copy whose balance crosses
    zero still meets it.
    """
    from PIL import ImageOps

    image = open_image(data)
    grey = _grey32(image)
    balance = horizontal_balance(grey) if flips else 1.0
    orientations = [balance < 0] if abs(balance) >= FLIP_MARGIN else [False, True]
    entries = []
    for mirrored in orientations:
        oriented = ImageOps.mirror(image) if mirrored else image
        thumb = thumbnail(oriented)
        for smooth in kinds:
            if smooth:
                search = smooth_hash(grey[:, ::-1] if mirrored else grey)
            else:
                search = perceptual_hash(oriented, hash_name, hash_size)
            flags = ((MIRRORED if mirrored else 0) | (SMOOTH if smooth else 0)
                     | (LOW_CONTRAST if low_contrast else 0))
            entries.append(bytes([flags]) + search.to_bytes(8, "big") + thumb)
    return b"".join(entries)


def split_entries(near: bytes) -> List[Tuple[int, int, bytes]]:
    """(flags, search hash, thumbnail) of each entry."""
    return [(near[i], int.from_bytes(near[i + 1:i + 9], "big"), near[i + 9:i + ENTRY_BYTES])
            for i in range(0, len(near) - ENTRY_BYTES + 1, ENTRY_BYTES)]


def verify_distance(a: bytes, b: bytes, low_contrast: bool = False) -> float:
    """How far apart two thumbnails are, in units of the tolerances: <= 1.0 is a near duplicate.

    The largest of: luma structure (1 - correlation of the 6x6 luma with mean
    and spread removed, so brightness and contrast changes pass), luma level
    and spread ratios, and the 2x2 chroma difference.  A greyscale image
    matches a coloured one only when both have clear luma structure (a
    greyscale copy of a photograph); a flat grey sky does not match an orange one.

    ``low_contrast`` (either image has low information) adds a stricter test:
    the luma residual after the best affine fit (brightness and contrast are
    affine) within LOW_RESIDUAL grey levels and the chroma within LOW_CHROMA;
    a thumbnail without luma structure (spread under FLAT_SPREAD) cannot be
    verified at all (UNVERIFIABLE): such images are left to exact dedup.
    """
    if a > b:  # the chroma fit scales one side: a fixed order keeps the distance symmetric
        a, b = b, a
    n = VERIFY_SIDE ** 2
    ya = np.frombuffer(a[:n], dtype=np.uint8).astype(np.float64)
    yb = np.frombuffer(b[:n], dtype=np.uint8).astype(np.float64)
    ca = np.frombuffer(a[n:], dtype=np.uint8).astype(np.float64) - 128
    cb = np.frombuffer(b[n:], dtype=np.uint8).astype(np.float64) - 128
    sa, sb = ya.std(), yb.std()
    level = abs(math.log((ya.mean() + 8) / (yb.mean() + 8))) / math.log(LEVEL_RATIO)
    spread = abs(math.log((sa + FLAT_SPREAD) / (sb + FLAT_SPREAD))) / math.log(SPREAD_RATIO)
    if min(sa, sb) >= FLAT_SPREAD:
        correlation = float(np.dot(ya - ya.mean(), yb - yb.mean()) / (len(ya) * sa * sb))
        structure = (1 - correlation) / (1 - MIN_CORRELATION)
    else:  # nearly flat: no structure to correlate, the pixels themselves must agree
        structure = float(np.sqrt(np.mean((ya - ya.mean() - (yb - yb.mean())) ** 2))) / FLAT_SPREAD
    ga, gb = float(np.sqrt(np.mean(ca ** 2))), float(np.sqrt(np.mean(cb ** 2)))
    if ga < GREY and gb < GREY:
        colour = 0.0
    elif min(ga, gb) < GREY and min(sa, sb) < FLAT_SPREAD:
        colour = max(ga, gb) / CHROMA_TOLERANCE  # flat grey vs flat colour: the colour decides
    elif min(ga, gb) < GREY:
        # A greyscale copy keeps its original's luma: allowed when the luma agrees closely.
        luma = max(level * math.log(LEVEL_RATIO) / math.log(GREY_LUMA_RATIO),
                   spread * math.log(SPREAD_RATIO) / math.log(GREY_LUMA_RATIO),
                   structure * (1 - MIN_CORRELATION) / (1 - GREY_MIN_CORRELATION))
        colour = luma
    else:
        # Chroma scales with brightness and contrast: compare after the best scale (within bounds).
        scale = min(max(float(np.dot(ca, cb) / max(np.dot(ca, ca), 1e-9)), 1 / CHROMA_SCALE),
                    CHROMA_SCALE)
        colour = float(np.sqrt(np.mean((scale * ca - cb) ** 2))) / CHROMA_TOLERANCE
    if low_contrast:
        if min(sa, sb) < FLAT_SPREAD:
            return UNVERIFIABLE
        correlation = float(np.dot(ya - ya.mean(), yb - yb.mean()) / (len(ya) * sa * sb))
        residual = min(sa, sb) * math.sqrt(max(0.0, 1 - correlation ** 2)) / LOW_RESIDUAL
        strict_colour = 0.0
        if min(ga, gb) >= GREY:  # a greyscale copy: the luma rule above already decides
            strict_colour = colour * CHROMA_TOLERANCE / LOW_CHROMA
        return max(level, spread, structure, colour, residual, strict_colour)
    return max(level, spread, structure, colour)


# --------------------------------------------------------------------------- representatives

Rank = Tuple[int, int, str]


def rank(uid: str, width: Optional[int], height: Optional[int], history: bool = False) -> Rank:
    """Sort key of a candidate representative: smaller wins.

    History samples first, then the largest original pixel count, then the
    smallest uid: a total order, so every runner picks the same one.
    """
    pixels = (width or 0) * (height or 0)
    return (0 if history else 1, -pixels, uid)


# --------------------------------------------------------------------------- candidate pairs

def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def default_blocks(max_distance: int, bits: int = 64) -> int:
    """m = k + 3 (three blocks per key, see the module docstring), capped at the bit count."""
    return min(max_distance + 3, bits)


def block_bounds(bits: int, blocks: int) -> List[Tuple[int, int]]:
    """[start, stop) bit ranges of ``blocks`` near-equal blocks (bit 0 = least significant)."""
    return [(bits * j // blocks, bits * (j + 1) // blocks) for j in range(blocks)]


def key_masks(bits: int, blocks: int, max_distance: int) -> np.ndarray:
    """One uint64 mask per key: the union of each choice of blocks - max_distance blocks."""
    if bits > 64:
        raise ValueError("near-duplicate search supports hashes of at most 64 bits")
    if not max_distance < blocks <= bits:
        raise ValueError(f"need max_distance < blocks <= bits, got k={max_distance}, "
                         f"m={blocks}, bits={bits}")
    block_masks = [((1 << (stop - start)) - 1) << start for start, stop in block_bounds(bits, blocks)]
    masks = [sum(block_masks[j] for j in chosen)
             for chosen in itertools.combinations(range(blocks), blocks - max_distance)]
    return np.array(masks, dtype=np.uint64)


_MIX = np.uint64(0x9E3779B97F4A7C15)


def bucket_partition(key_index: np.ndarray, masked: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each bucket (deterministic: a multiplicative hash of (key, value))."""
    with np.errstate(over="ignore"):
        mixed = (masked ^ (key_index.astype(np.uint64) * _MIX)) * _MIX
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


def bucket_entries(hashes: np.ndarray, masks: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key index, hash, masked value) for every hash and key: len(hashes) * len(masks) entries."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    keys = np.repeat(np.arange(len(masks), dtype=np.uint8), len(hashes))
    tiled = np.tile(hashes, len(masks))
    return keys, tiled, tiled & masks[keys]


def partitioned_entries(hashes: np.ndarray, masks: np.ndarray, partitions: int
                        ) -> Iterator[Tuple[int, bytes, bytes]]:
    """(partition, key indices, hashes) of ``hashes``' bucket entries, one item per partition used.

    The partitions come in ascending order; a partition's key indices (uint8)
    and hashes (uint64) are raw bytes, its entries in (key index, hash
    position) order: what a stable sort of bucket_entries() by bucket_partition()
    gives.  Computed one key at a time (a counting sort), so it takes about the
    output's 9 bytes an entry and 2 more for the partition numbers, not the
    several arrays of 8 bytes an entry a sort of all entries at once holds
    (about 4 KB a hash, 84 keys of 50 bytes).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = hashes.size
    part_type = np.min_scalar_type(max(partitions - 1, 0))
    parts = np.empty((len(masks), n), dtype=part_type)
    counts = np.zeros(partitions, dtype=np.int64)
    for k, mask in enumerate(masks):
        parts[k] = bucket_partition(np.uint8(k), hashes & mask, partitions)
        counts += np.bincount(parts[k], minlength=partitions)
    starts = np.cumsum(counts) - counts
    cursor = starts.copy()
    keys = np.empty(n * len(masks), dtype=np.uint8)
    values = np.empty(n * len(masks), dtype=np.uint64)
    for k in range(len(masks)):
        order = np.argsort(parts[k], kind="stable")
        sorted_parts = parts[k][order].astype(np.int64)
        here = np.bincount(sorted_parts, minlength=partitions)
        # An entry's place: its partition's cursor plus its rank among this key's entries there.
        rank_in_part = np.arange(n) - (np.cumsum(here) - here)[sorted_parts]
        target = cursor[sorted_parts] + rank_in_part
        keys[target] = k
        values[target] = hashes[order]
        cursor += here
    del parts
    for p in np.flatnonzero(counts):
        start, stop = starts[p], starts[p] + counts[p]
        yield int(p), keys[start:stop].tobytes(), values[start:stop].tobytes()


def windowed_comparisons(starts: np.ndarray, max_comparisons: Optional[int], stats) -> np.ndarray:
    """Items sorted into buckets (``starts`` marks each bucket's first): how many of the items
    after each one, in its bucket, it is compared with.

    All pairs of a bucket, unless their count is over ``max_comparisons``: such a
    hot bucket is compared in a sliding window (each item with the next
    max_comparisons // size).  Sets ``stats``' overflowing, comparisons and
    skipped (the pHash buckets' and the semantic bands' figures alike).
    """
    n = starts.size
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    sizes = np.diff(np.append(first, n))
    position = np.arange(n) - first[group]
    all_pairs = sizes * (sizes - 1) // 2
    window = sizes - 1
    if max_comparisons is not None:
        hot = all_pairs > max_comparisons
        if hot.any():
            window = np.where(hot, np.maximum(1, max_comparisons // np.maximum(sizes, 1)), window)
            stats.overflowing = int(hot.sum())
    remaining = np.minimum(sizes[group] - 1 - position, window[group])
    stats.comparisons = int(remaining.sum())
    stats.skipped = int(all_pairs.sum()) - stats.comparisons
    return remaining


@dataclass
class BucketStats:
    comparisons: int = 0
    pairs: int = 0
    overflowing: int = 0   # buckets over max_comparisons
    skipped: int = 0       # comparisons not made in those buckets


def bucket_pairs(key_index: np.ndarray, hashes: np.ndarray, masks: np.ndarray,
                 max_distance: int, max_comparisons: Optional[int] = None
                 ) -> Tuple[np.ndarray, BucketStats]:
    """Pairs (a < b) within max_distance among entries (key index, distinct-per-key hash).

    Entries are grouped by (key, masked hash); every pair in a group is
    verified (or a window of it, in groups over max_comparisons).  A pair is
    kept only in the first key on which it agrees, so that across all
    partitions it is reported exactly once.
    """
    stats = BucketStats()
    key_index = np.asarray(key_index, dtype=np.uint8)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.size < 2:
        return np.empty((0, 2), dtype=np.uint64), stats
    masked = hashes & masks[key_index]
    order = np.lexsort((hashes, masked, key_index))
    keys, values, hashes = key_index[order], masked[order], hashes[order]
    n = hashes.size
    starts = np.ones(n, dtype=bool)
    starts[1:] = (keys[1:] != keys[:-1]) | (values[1:] != values[:-1])
    remaining = windowed_comparisons(starts, max_comparisons, stats)

    found_a, found_b, found_key = [], [], []
    active = np.flatnonzero(remaining >= 1)
    offset = 1
    while active.size:
        a, b = hashes[active], hashes[active + offset]
        near = np.bitwise_count(a ^ b) <= max_distance
        if near.any():
            found_a.append(a[near])
            found_b.append(b[near])
            found_key.append(keys[active[near]])
        offset += 1
        active = active[remaining[active] >= offset]
    if not found_a:
        return np.empty((0, 2), dtype=np.uint64), stats
    a, b, key = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_key)
    # Keep the pair only in the first key on which the two hashes agree.
    diff = a ^ b
    canonical = np.ones(a.size, dtype=bool)
    for index in range(int(key.max())):
        earlier = (key > index) & ((diff & masks[index]) == 0)
        canonical &= ~earlier
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[canonical]
    stats.pairs = int(pairs.shape[0])
    return pairs, stats


def near_pairs(distinct: np.ndarray, max_distance: int, bits: int = 64,
               blocks: Optional[int] = None, max_comparisons: Optional[int] = None
               ) -> Tuple[np.ndarray, BucketStats]:
    """All pairs (a < b) of *distinct* hash values within max_distance, in one process."""
    masks = key_masks(bits, blocks or default_blocks(max_distance, bits), max_distance)
    keys, tiled, _ = bucket_entries(distinct, masks)
    return bucket_pairs(keys, tiled, masks, max_distance, max_comparisons)


def keys_per_hash(blocks: int, max_distance: int) -> int:
    return math.comb(blocks, blocks - max_distance)
