"""Near duplicates in two stages: search entries (smooth hash, flips) and their verification."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from paircurate.transforms.dedup import DedupConfig, near_edges, verified_edges
from paircurate.transforms.phash import (
    ENTRY_BYTES,
    MIRRORED,
    SMOOTH,
    _grey32,
    hamming,
    information,
    near_entries,
    perceptual_hash,
    signature,
    smooth_hash,
    split_entries,
    thumbnail,
    verify_distance,
)

K = DedupConfig().max_distance


def sky(seed: int, top=(40, 110, 210), size=(480, 320)) -> Image.Image:
    """A smooth photograph-like sky: a vertical gradient, faint clouds, sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    t = np.linspace(0, 1, h)[:, None, None]
    top = np.array(top, dtype=float)
    base = top * (1 - t) + np.minimum(255, top + 60) * t + np.zeros((h, w, 3))
    clouds = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    base = base + 6 * np.asarray(clouds, dtype=float)[..., None] / 255
    base = base + rng.normal(0, 1.5, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def scene(seed: int, size=(480, 320)) -> Image.Image:
    """A textured image whose left and right halves differ (so its orientation is clear)."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size[0] // 3, size[1]], fill=(240, 240, 230))
    for _ in range(14):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse([x, y, x + rng.randint(20, 140), y + rng.randint(20, 100)],
                     fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


COPIES = {
    "jpeg_q40": lambda im: jpeg(im, 40),
    "resize_0.5": lambda im: im.resize((im.width // 2, im.height // 2), Image.BICUBIC),
    "bright_+12": lambda im: ImageEnhance.Brightness(im).enhance(1.12),
    "bright_-12": lambda im: ImageEnhance.Brightness(im).enhance(0.88),
    "contrast_+20": lambda im: ImageEnhance.Contrast(im).enhance(1.2),
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
}


# --------------------------------------------------------------------------- verification

@pytest.mark.parametrize("name", sorted(COPIES))
def test_verification_accepts_copies_of_textured_images(name):
    for seed in range(4):
        image = scene(seed)
        assert verify_distance(thumbnail(image), thumbnail(COPIES[name](image))) <= 1.0, (name, seed)


@pytest.mark.parametrize("name", sorted(set(COPIES) - {"greyscale"}))
def test_verification_accepts_copies_of_smooth_images(name):
    for seed in range(4):
        image = sky(seed)
        assert verify_distance(thumbnail(image), thumbnail(COPIES[name](image))) <= 1.0, (name, seed)


def test_verification_rejects_distinct_smooth_and_flat_images():
    blue, orange = sky(1), sky(1, top=(200, 120, 60))
    grey = Image.new("RGB", (480, 320), (128, 128, 128))
    red = Image.new("RGB", (480, 320), (200, 40, 40))
    pairs = [(blue, orange),                                   # one layout, other colours
             (blue, blue.transpose(Image.FLIP_TOP_BOTTOM)),     # one colour, other layout
             (grey, red), (grey, ImageOps.grayscale(orange).convert("RGB").point(lambda v: v // 2)),
             (ImageOps.grayscale(blue).convert("RGB"), orange)]  # grey smooth vs coloured smooth
    for a, b in pairs:
        assert verify_distance(thumbnail(a), thumbnail(b)) > 1.0
    # A greyscale image matches a coloured one only where there is luma structure to compare.
    assert verify_distance(thumbnail(scene(3)), thumbnail(COPIES["greyscale"](scene(3)))) <= 1.0


def test_verification_distance_is_symmetric():
    # Runners group entries in any order: the distance (and the ledger's error) must not depend on it.
    images = [scene(1), COPIES["bright_+12"](scene(1)), COPIES["contrast_+20"](scene(1)), sky(2),
              COPIES["bright_-12"](sky(2)), COPIES["greyscale"](sky(2)), sky(2, top=(200, 120, 60))]
    thumbs = [thumbnail(image) for image in images]
    for a in thumbs:
        for b in thumbs:
            assert verify_distance(a, b) == verify_distance(b, a)


def test_verification_rejects_distinct_textured_images():
    for seed in range(6):
        assert verify_distance(thumbnail(scene(seed)), thumbnail(scene(seed + 100))) > 1.0


def test_verified_edges_skip_an_image_with_itself_and_report_rejections():
    a, b, c = thumbnail(sky(1)), thumbnail(jpeg(sky(1), 40)), thumbnail(sky(1, top=(200, 120, 60)))
    ra, rb, rc = (1, -10, "a"), (1, -5, "b"), (1, -5, "c")
    entries = [(ra, 0, a), (ra, MIRRORED, a), (rb, 0, b), (rc, 0, c)]
    accepted, rejected = verified_edges(entries, None, 7, 7, DedupConfig())
    assert [(x[2], y[2]) for x, y, _ in accepted] == [("a", "b"), ("a", "b")]  # both of a's entries
    assert len(rejected) == 3 and all(note[2] > 1.0 for note in rejected)
    # The second entry pair was a's mirrored entry against b's plain one: that is a flip.
    assert sorted(note[0] for _, _, note in accepted) == ["flip", "phash"]
    # Without verification every candidate is an edge (the old rule).
    accepted, _ = verified_edges(entries, None, 7, 7, DedupConfig(verify=False))
    assert len(accepted) == 5


# --------------------------------------------------------------------------- search entries

def test_smooth_hash_holds_for_re_encoded_sky_where_phash_does_not():
    smooth_d, phash_d = [], []
    for seed in range(12):
        image, copy = sky(seed), jpeg(sky(seed), 40)
        smooth_d.append(hamming(smooth_hash(_grey32(image)), smooth_hash(_grey32(copy))))
        phash_d.append(hamming(perceptual_hash(image), perceptual_hash(copy)))
    assert max(smooth_d) <= K
    assert max(phash_d) > K  # the reason for the smooth hash
    # Brightness and contrast do not change its bits' signs.
    image = sky(3)
    for name in ("bright_+12", "bright_-12", "contrast_+20"):
        assert hamming(smooth_hash(_grey32(image)), smooth_hash(_grey32(COPIES[name](image)))) <= K


def test_flips_give_a_mirrored_copy_the_same_canonical_entry():
    for seed in range(6):
        image = scene(seed)
        entries = split_entries(near_entries(image, flips=True))
        mirrored = split_entries(near_entries(ImageOps.mirror(image), flips=True))
        assert len(entries) == len(mirrored) == 1  # clear orientation: one entry each
        (fa, ha, ta), (fb, hb, tb) = entries[0], mirrored[0]
        assert (fa ^ fb) & MIRRORED  # one of them was mirrored into the canonical orientation
        assert hamming(ha, hb) <= 2 and verify_distance(ta, tb) <= 0.2
    assert len(near_entries(scene(1), flips=False)) == ENTRY_BYTES


def test_an_image_of_ambiguous_orientation_has_both_entries():
    symmetric = Image.new("RGB", (400, 300), (30, 60, 90))
    draw = ImageDraw.Draw(symmetric)
    draw.rectangle([150, 50, 250, 250], fill=(230, 200, 40))  # centred: no side is brighter
    entries = split_entries(near_entries(symmetric, flips=True))
    assert [f & MIRRORED for f, _, _ in entries] == [0, MIRRORED]


def test_signature_flags_flat_images_and_uses_the_smooth_hash_for_smooth_ones():
    config = DedupConfig()
    from paircurate.transforms.phash import LOW_CONTRAST

    flat = Image.new("RGB", (300, 200), (90, 90, 200))
    near = signature(flat, min_information=config.min_information).near
    assert near and all(flags & LOW_CONTRAST for flags, _, _ in split_entries(near))
    image = sky(2)
    assert information(image) < config.smooth_below
    near = signature(image, min_information=config.min_information, smooth_below=config.smooth_below,
                     flips=True).near
    assert near and all(flags & SMOOTH for flags, _, _ in split_entries(near))


def _sig(uid, image, pixels=1000):
    from paircurate.transforms.dedup import record_signature
    from paircurate.transforms.phash import hash_hex

    config = DedupConfig()
    s = signature(image, min_information=config.min_information, smooth_below=config.smooth_below,
                  flips=config.flips)
    return record_signature({"uid": uid, "original_width": pixels, "original_height": 1,
                             "image_sha256": s.sha256, "phash": hash_hex(s.phash),
                             "low_information": s.information < config.min_information,
                             "near_signature": s.near.hex()})


def test_near_edges_catch_smooth_copies_and_flips_and_keep_distinct_skies_apart():
    sigs = [_sig("sky", sky(5)), _sig("sky-q40", jpeg(sky(5), 40)),
            _sig("sky-flip", ImageOps.mirror(sky(5))), _sig("sky-bright", COPIES["bright_+12"](sky(5))),
            _sig("other-sky", sky(6, top=(200, 120, 60))), _sig("scene", scene(1)),
            _sig("scene-flip", jpeg(ImageOps.mirror(scene(1)), 75))]
    from oracles import connected_components

    clusters = connected_components([s[0] for s in sigs], near_edges(sigs, DedupConfig()))
    assert len({clusters[u] for u in ("sky", "sky-q40", "sky-flip", "sky-bright")}) == 1
    assert clusters["other-sky"] not in (clusters["sky"], clusters["scene"])
    assert clusters["scene-flip"] == clusters["scene"] != clusters["sky"]
    # The old rule (exact only under information 4.0, no flips) catches none of the sky copies:
    # low-information images without entries, as ledgers from before the low-contrast rule hold them.
    old = DedupConfig(min_information=4.0, smooth_below=0.0, flips=False, verify=False)
    old_sigs = [(u, r, sha, ph, True, b"") if u.startswith(("sky", "other")) else (u, r, sha, ph, low, near)
                for u, r, sha, ph, low, near in sigs]
    assert all(not ({a, b} & {"sky-q40", "sky-flip"}) for a, b in near_edges(old_sigs, old))


def test_node_keys_sort_like_ranks_and_give_back_the_uid():
    from paircurate.transforms.dedup import node_key, node_uid, pack_note, unpack_note
    from paircurate.transforms.phash import rank

    uids = ["0f" * 16, "10" * 16, "ab", "b", "u1", "ab cd", "AB"]
    ranks = [rank(u, w, 10, history=h) for u in uids for w in (0, 7, 1 << 40) for h in (False, True)]
    keys = [node_key(r) for r in ranks]
    for r, k in zip(ranks, keys):
        assert node_uid(k) == r[2]
    # Same order wherever the uids are all hex or all text (the representative choice).
    for group in (uids[:3], uids[3:]):  # lowercase hex, then text
        subset = [(r, k) for r, k in zip(ranks, keys) if r[2] in group]
        assert sorted(subset) == sorted(subset, key=lambda rk: rk[1])
    for note in [("phash", 0, 0.0), ("smooth", 6, 0.999), ("flip", 64, 12.5)]:
        assert unpack_note(pack_note(note)) == note
    assert pack_note(("flip", 6, 0.1)) < pack_note(("phash", 0, 0.2))  # nearest by verification first


def test_bounded_verification_does_not_depend_on_element_order():
    thumbs = [thumbnail(jpeg(sky(4), q)) for q in (40, 60, 80, 95)]
    entries = [(bytes([1, i]), 0, t) for i, t in enumerate(thumbs)]
    config = DedupConfig()
    first, _ = verified_edges(entries, None, 1, 1, config, max_comparisons=3)
    for seed in range(5):
        shuffled = list(entries)
        random.Random(seed).shuffle(shuffled)
        assert verified_edges(shuffled, None, 1, 1, config, max_comparisons=3)[0] == first
    assert len(first) == 3  # the window held: 3 of the 6 pairs were compared


# --------------------------------------------------------------------------- low information

def gradient_sky(top: float, bottom: float, colour=(0.75, 0.85, 1.0), size=(480, 320), seed=0,
                 curve: float = 1.0) -> Image.Image:
    """A low-information photograph: a faint vertical gradient (grey levels top -> bottom), sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = top + (bottom - top) * np.linspace(0, 1, h) ** curve
    luma = ramp[:, None, None] * np.array(colour)[None, None, :]
    pixels = luma + np.zeros((h, w, 3)) + rng.normal(0, 1.0, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _low_entries(image: Image.Image) -> bytes:
    config = DedupConfig()
    return signature(image, min_information=config.min_information, smooth_below=config.smooth_below,
                     flips=config.flips).near


def test_low_information_images_get_entries_flagged_for_the_strict_rule():
    from paircurate.transforms.phash import LOW_CONTRAST

    image = gradient_sky(150, 190)
    assert information(image) < DedupConfig().min_information
    entries = split_entries(_low_entries(image))
    assert entries and all(flags & LOW_CONTRAST for flags, _, _ in entries)
    assert not any(flags & LOW_CONTRAST for flags, _, _ in split_entries(_low_entries(scene(1))))


def test_low_contrast_verification_keeps_copies_and_rejects_other_gradients_and_flat_images():
    base = gradient_sky(150, 190)
    copies = [COPIES[name](base) for name in ("jpeg_q40", "resize_0.5", "bright_+12", "bright_-12",
                                              "contrast_+20")]
    for copy in copies:
        assert verify_distance(thumbnail(base), thumbnail(copy), low_contrast=True) <= 1.0
    # Another crop of the same sky: a little darker, the gradient curved, a little bluer.  The ordinary
    # rule lets it pass (brightness and contrast copies look like this); the strict one does not.
    other = gradient_sky(143, 178, colour=(0.73, 0.85, 1.04), curve=1.6)
    assert verify_distance(thumbnail(base), thumbnail(other)) <= 1.0
    assert verify_distance(thumbnail(base), thumbnail(other), low_contrast=True) > 1.0
    # Truly flat (no luma structure in the thumbnail): nothing to verify, exact dedup only.
    flat = gradient_sky(180, 181, colour=(1, 1, 1))
    assert verify_distance(thumbnail(flat), thumbnail(jpeg(flat, 40)), low_contrast=True) > 1.0


def test_near_edges_catch_copies_of_low_information_images():
    base, other = gradient_sky(150, 190), gradient_sky(143, 178, colour=(0.73, 0.85, 1.04), curve=1.6, seed=1)
    flat = gradient_sky(180, 181, colour=(1, 1, 1), seed=2)
    images = {"base": base, "bright": COPIES["bright_+12"](base), "q40": jpeg(base, 40),
              "other": other, "flat": flat, "flat_q40": jpeg(flat, 40)}
    config = DedupConfig()
    sigs = []
    for uid, image in images.items():
        s = signature(image, min_information=config.min_information, smooth_below=config.smooth_below,
                      flips=config.flips)
        sigs.append((uid, (1, 0, uid), s.sha256, s.phash, s.information < config.min_information, s.near))
    edges = {tuple(sorted(e)) for e in near_edges(sigs, config)}
    assert ("base", "bright") in edges and ("base", "q40") in edges
    assert not any("other" in e or "flat" in e or "flat_q40" in e for e in edges)
