"""Near-duplicate quality of the perceptual hash, on generated images or on real photographs.

Two modes.  ``--photographs`` is the one to trust (see its section below);
the default, generated mode is fast and sweeps the hash's own parameters.

Generated mode.
Generates distinct base images (shapes, text, noise textures, mixtures; plus
nearly flat ones: solid colours with sensor noise, linear and radial
gradients, sky) and, for each, a family of copies (JPEG re-encodes, resizes,
crops, brightness, a small text overlay, greyscale, horizontal flip).  Prints:

* per transform, the recall at k (copy within k bits of its base);
* per k, the mean recall and the share of distinct families wrongly merged
  (any member within k bits of a member of another family), with and without
  the low-information rule (images under min_information take no part in near dedup);
* the information measure's distribution on flat and structured images.

Photographs mode.  Real photographs from Debian packages that carry
photographic wallpapers: ``mate-backgrounds`` (its nature/ folder, 12 photos)
and ``plasma-workspace-wallpapers`` (the 12 photographs named in PLASMA_PHOTOS;
the rest of that package is illustration).  The benchmark installs them with
apt-get when they are missing (root, or pass --no-install and install them
yourself); no photograph is kept in the repository.  From each photograph it
cuts distinct crops (random sizes and shapes, overlapping each other by at most
a quarter of the smaller one) and saves each as a JPEG of 320-640 px: the
bases.  Crops of one photograph are the hard negatives (same light, same
colours, same sky).  Each base gets transformed copies (PHOTO_TRANSFORMS: JPEG
q40, WebP q70, 0.5x and 1.7x resizes, a 0.3x JPEG thumbnail, brightness and
contrast +-, greyscale, horizontal flip (plain and re-encoded), 5% and 10%
crops, a 3 degree rotation, a 10% letterbox, a corner watermark).  Every image
is hashed with the pipeline's own signature code, then each rule decides as
the pipeline does (exact groups, candidate pairs, verification, connected
components), in one process.  Printed: recall per transform (the copy ends in
its base's cluster) and the share of bases wrongly merged (their cluster holds
a member of another base's family), overall and split at information 4.0
(textured / smooth), for the old rule and the default config side by side.

Usage:  python benchmarks/near_duplicate_quality.py [--bases 2000] [--flat 200] [--k 8]
        python benchmarks/near_duplicate_quality.py --photographs [--crops-per-photo 18]
            [--bases N] (a fixed seeded sample of the bases, to iterate quickly)
            [--only-default] [--diagnose] [--cache hashed.pkl]
Photographs mode also prints recall and merges per information band (flat
under 0.75, smooth under 4.0, textured); --diagnose adds the verification
distances of the missed copies and of each base's nearest distinct base.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import random
import string
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from paircurate.transforms.phash import information, perceptual_hash

THRESHOLDS = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0]

TRANSFORMS = ["jpeg_q30", "jpeg_q50", "jpeg_q75", "jpeg_q95", "resize_0.25", "resize_0.5",
              "resize_2", "crop_5", "crop_10", "bright_+15", "bright_-15", "text_overlay",
              "greyscale", "flip"]


# --------------------------------------------------------------------------- generators

def _colour(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(2, 9)))
                    for _ in range(n))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _gradient(rng: random.Random, w: int, h: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = (x * np.cos(angle) + y * np.sin(angle))
    t = (t - t.min()) / max(1e-9, np.ptp(t))
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _noise_texture(rng: random.Random, w: int, h: int) -> np.ndarray:
    nrng = np.random.default_rng(rng.randrange(2 ** 32))
    cells = rng.choice([4, 8, 16, 32, 64])
    small = nrng.random((cells, cells, 3)) * 255
    big = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float64)


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, n: int) -> None:
    for _ in range(n):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)
        kind = rng.randrange(4)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 2:
            draw.polygon([(rng.randrange(w), rng.randrange(h)) for _ in range(rng.randint(3, 6))],
                         fill=_colour(rng))
        else:
            draw.line([x0, y0, x1, y1], fill=_colour(rng), width=rng.randint(2, 12))


def _draw_text(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, lines: int) -> None:
    for _ in range(lines):
        draw.text((rng.randrange(w // 2), rng.randrange(h)), _words(rng, rng.randint(1, 4)),
                  fill=_colour(rng), font=_font(rng.randint(14, 56)))


def structured_image(seed: int) -> Image.Image:
    """A distinct image with structure: shapes, text, noise textures or a mixture."""
    rng = random.Random(seed)
    w, h = rng.randint(256, 512), rng.randint(256, 512)
    kind = seed % 4
    if kind == 2:
        base = _noise_texture(rng, w, h)
    elif kind == 3 or rng.random() < 0.5:
        base = _gradient(rng, w, h)
    else:
        base = np.ones((h, w, 3)) * np.array(_colour(rng))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if kind in (0, 3):
        _draw_shapes(draw, rng, w, h, rng.randint(3, 15))
    if kind in (1, 3):
        _draw_text(draw, rng, w, h, rng.randint(2, 8))
    if kind == 2 and rng.random() < 0.5:
        _draw_shapes(draw, rng, w, h, rng.randint(1, 4))
    return image


def flat_image(seed: int) -> Image.Image:
    """A nearly flat image: solid colour with noise, linear or radial gradient, or sky."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    w, h = rng.randint(256, 512), rng.randint(256, 512)
    kind = seed % 4
    if kind == 0:
        base = np.ones((h, w, 3)) * np.array(_colour(rng))
    elif kind == 1:
        base = _gradient(rng, w, h)
    elif kind == 2:
        y, x = np.mgrid[0:h, 0:w]
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.hypot(x - cx, y - cy)
        t = t / t.max()
        a, b = np.array(_colour(rng)), np.array(_colour(rng))
        base = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    else:  # sky: a vertical blue gradient with faint clouds
        top = np.array([rng.randint(20, 90), rng.randint(80, 150), rng.randint(170, 255)])
        bottom = np.minimum(255, top + rng.randint(40, 100))
        t = np.linspace(0, 1, h)[:, None, None]
        base = top * (1 - t) + bottom * t + np.zeros((h, w, 3))
        clouds = nrng.random((8, 8))
        clouds = np.asarray(Image.fromarray((clouds * 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC), dtype=np.float64) / 255
        base = base + 12 * clouds[..., None]
    base = base + nrng.normal(0, rng.uniform(0.5, 3), base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def transformed(image: Image.Image, name: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    w, h = image.size
    if name.startswith("jpeg_q"):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(name[6:]))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if name.startswith("resize_"):
        f = float(name[7:])
        return image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)
    if name.startswith("crop_"):
        frac = int(name[5:]) / 100
        dx, dy = round(w * frac), round(h * frac)
        left, top = rng.randint(0, dx), rng.randint(0, dy)
        return image.crop((left, top, w - (dx - left), h - (dy - top)))
    if name.startswith("bright_"):
        return ImageEnhance.Brightness(image).enhance(1 + int(name[7:]) / 100)
    if name == "text_overlay":
        out = image.copy()
        draw = ImageDraw.Draw(out)
        size = max(12, h // 20)
        draw.text((rng.randint(0, w // 3), h - size - rng.randint(4, 20)), "(c) " + _words(rng, 2),
                  fill=(255, 255, 255), font=_font(size))
        return out
    if name == "greyscale":
        return ImageOps.grayscale(image).convert("RGB")
    if name == "flip":
        return ImageOps.mirror(image)
    raise ValueError(name)


def family(args) -> Tuple[int, bool, List[Tuple[str, int, float]]]:
    """(base id, flat?, [(variant, phash, information)]) for one base and its copies."""
    index, flat, seed = args
    image = flat_image(seed) if flat else structured_image(seed)
    rows = [("base", perceptual_hash(image), information(image))]
    for name in TRANSFORMS:
        copy = transformed(image, name, seed * 31 + len(rows))
        rows.append((name, perceptual_hash(copy), information(copy)))
    return index, flat, rows


def build(bases: int, flat: int, workers: int = 2, seed: int = 0):
    jobs = [(i, False, seed + i) for i in range(bases)] + \
           [(bases + i, True, seed + 10 ** 6 + i) for i in range(flat)]
    if workers <= 1:
        return sorted(map(family, jobs))
    with multiprocessing.Pool(workers) as pool:
        return sorted(pool.map(family, jobs, chunksize=16))


# --------------------------------------------------------------------------- measures

def min_cross_family(hashes: np.ndarray, families: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Per family, the least Hamming distance from any member to a member of another family."""
    n_fam = int(families.max()) + 1
    best = np.full(n_fam, 255, dtype=np.int64)
    idx = np.flatnonzero(eligible)
    h, f = hashes[idx], families[idx]
    for start in range(0, idx.size, 1024):
        d = np.bitwise_count(h[start:start + 1024, None] ^ h[None, :]).astype(np.int64)
        d[f[start:start + 1024, None] == f[None, :]] = 255
        np.minimum.at(best, f[start:start + 1024], d.min(axis=1))
    return best


def evaluate(data, ks=range(0, 15), min_information: float = 4.0, chosen_k: int = 8) -> Dict:
    fams, hashes, infos, variants, flat_flags = [], [], [], [], []
    for index, flat, rows in data:
        for name, h, info in rows:
            fams.append(index), hashes.append(h), infos.append(info), variants.append(name)
            flat_flags.append(flat)
    fams = np.array(fams)
    hashes = np.array(hashes, dtype=np.uint64)
    infos = np.array(infos)
    variants = np.array(variants)
    flat_flags = np.array(flat_flags)
    base_hash = {i: rows[0][1] for i, _, rows in data}
    dist_to_base = np.bitwise_count(hashes ^ np.array([base_hash[f] for f in fams], dtype=np.uint64))
    low = infos < min_information
    structured = ~flat_flags
    result = {"recall": {}, "recall_rule": {}, "fp": {}, "fp_rule": {}, "fp_struct": {},
              "fp_struct_rule": {}, "info": {}}
    all_on = np.ones(hashes.size, dtype=bool)
    cross = min_cross_family(hashes, fams, all_on)
    cross_rule = min_cross_family(hashes, fams, ~low)
    n_fam = cross.size
    fam_flat = np.zeros(n_fam, dtype=bool)
    fam_flat[fams[flat_flags]] = True
    for k in ks:
        for name in TRANSFORMS:
            sel = structured & (variants == name)
            result["recall"][(k, name)] = float(np.mean(dist_to_base[sel] <= k))
            base_low = low[structured & (variants == "base")][fams[sel]]  # base ids == family ids
            result["recall_rule"][(k, name)] = float(np.mean((dist_to_base[sel] <= k) & ~low[sel]
                                                             & ~base_low))
        result["fp"][k] = float(np.mean(cross <= k))
        result["fp_rule"][k] = float(np.mean(cross_rule <= k))
        result["fp_struct"][k] = float(np.mean(cross[~fam_flat] <= k))
        result["fp_struct_rule"][k] = float(np.mean(cross_rule[~fam_flat] <= k))
    for label, sel in (("structured", structured & (variants == "base")),
                       ("structured copies", structured & (variants != "base")),
                       ("flat", flat_flags & (variants == "base")),
                       ("flat copies", flat_flags & (variants != "base"))):
        result["info"][label] = np.percentile(infos[sel], [1, 5, 50, 95, 99]).tolist()
    # The information threshold: at chosen_k, what each threshold costs in recall and saves in merges.
    is_base = variants == "base"
    result["sweep"] = []
    for threshold in THRESHOLDS:
        rule_low = infos < threshold
        fam_cross = min_cross_family(hashes, fams, ~rule_low)
        base_cross = min_cross_family(hashes, fams, ~rule_low & is_base)
        base_low = rule_low[is_base][fams]  # family ids are base order
        copies = structured & ~is_base & (variants != "flip")
        recall = float(np.mean((dist_to_base[copies] <= chosen_k) & ~rule_low[copies]
                               & ~base_low[copies]))
        result["sweep"].append((threshold, float(np.mean(rule_low[structured])),
                                float(np.mean(rule_low[flat_flags])), recall,
                                float(np.mean(fam_cross <= chosen_k)),
                                float(np.mean(base_cross <= chosen_k)),
                                float(np.mean(base_cross[~fam_flat] <= chosen_k))))
    result["low_share_structured"] = float(np.mean(low[structured]))
    result["low_share_flat"] = float(np.mean(low[flat_flags]))
    return result


def print_report(result, ks, chosen_k: int, min_information: float) -> None:
    print("\nInformation measure (grey levels), percentiles 1/5/50/95/99:")
    for label, values in result["info"].items():
        print(f"  {label:18s} " + " ".join(f"{v:7.2f}" for v in values))
    print(f"  below min_information={min_information}: structured images "
          f"{100 * result['low_share_structured']:.2f}%, flat images {100 * result['low_share_flat']:.1f}%")
    print(f"\nRecall per transform at k={chosen_k} (structured bases; copy within k of its base)")
    print(f"  {'transform':14s} {'recall':>7s} {'w/ rule':>8s}   k-2     k+2")
    for name in TRANSFORMS:
        r = result["recall"]
        print(f"  {name:14s} {r[(chosen_k, name)]:7.3f} {result['recall_rule'][(chosen_k, name)]:8.3f}"
              f" {r.get((chosen_k - 2, name), float('nan')):7.3f} {r.get((chosen_k + 2, name), float('nan')):7.3f}")
    print("\nPer k: mean recall (all transforms but flip), crop recall, and families wrongly merged")
    print("  (share of families with a member within k of another family's member)")
    print(f"  {'k':>3s} {'recall':>7s} {'crop10':>7s} {'FP all':>8s} {'FP rule':>8s} "
          f"{'FP struct':>10s} {'FP struct rule':>15s}")
    for k in ks:
        rec = np.mean([result["recall"][(k, n)] for n in TRANSFORMS if n != "flip"])
        print(f"  {k:3d} {rec:7.3f} {result['recall'][(k, 'crop_10')]:7.3f} "
              f"{100 * result['fp'][k]:7.2f}% {100 * result['fp_rule'][k]:7.2f}% "
              f"{100 * result['fp_struct'][k]:9.2f}% {100 * result['fp_struct_rule'][k]:14.2f}%")


def print_sweep(result, chosen_k: int) -> None:
    print(f"\nInformation threshold at k={chosen_k}: share flagged low, recall (no flip), merges")
    print(f"  {'min_info':>8s} {'low struct':>10s} {'low flat':>9s} {'recall':>7s} "
          f"{'FP families':>12s} {'FP bases':>9s} {'FP struct bases':>16s}")
    for t, ls, lf, rec, fam, base, sbase in result["sweep"]:
        print(f"  {t:8.1f} {100 * ls:9.2f}% {100 * lf:8.1f}% {rec:7.3f} {100 * fam:11.2f}% "
              f"{100 * base:8.2f}% {100 * sbase:15.2f}%")


# --------------------------------------------------------------------------- photographs mode

#: Debian packages with photographic wallpapers, and where their photographs are.
PHOTO_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")
MATE_PHOTOS = "/usr/share/backgrounds/mate/nature/*.jpg"
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                 "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am", "Volna")
PLASMA_DIR = "/usr/share/wallpapers/{}/contents/images/*"

PHOTO_TRANSFORMS = ["jpeg_q40", "webp_q70", "resize_0.5", "resize_1.7", "thumb_0.3", "bright_+12",
                    "bright_-12", "contrast_+20", "contrast_-20", "greyscale", "flip", "flip_jpeg",
                    "crop_5", "crop_10", "rotate_3", "letterbox_10", "watermark"]
#: The transforms the issue's goals are about (>= 0.97 recall each at the default config).
ROBUST = ["jpeg_q40", "webp_q70", "resize_0.5", "resize_1.7", "thumb_0.3", "bright_+12",
          "bright_-12", "contrast_+20", "contrast_-20", "greyscale", "flip", "flip_jpeg"]
#: Split for the merge figures: bases whose information is below this are "smooth".
SMOOTH_BELOW = 4.0


def photo_files(install: bool = True) -> List[str]:
    """The photographs, largest file of each; installs the packages with apt-get when missing."""
    import glob
    import os
    import subprocess

    def found():
        files = sorted(glob.glob(MATE_PHOTOS))
        for name in PLASMA_PHOTOS:
            candidates = glob.glob(PLASMA_DIR.format(name))
            if candidates:
                files.append(max(candidates, key=lambda f: _pixels(f)))
        return files

    files = found()
    if len(files) < 12 + len(PLASMA_PHOTOS) and install:
        print("installing " + " ".join(PHOTO_PACKAGES) + " with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PHOTO_PACKAGES],
                       check=False, env=env, stdout=subprocess.DEVNULL)
        files = found()
    if not files:
        raise SystemExit("no photographs found: apt-get install " + " ".join(PHOTO_PACKAGES))
    return files


def _pixels(path: str) -> int:
    with Image.open(path) as image:
        return image.width * image.height


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def photo_crops(path: str, count: int, rng: random.Random) -> List[bytes]:
    """Distinct crops of one photograph (overlap <= 1/4 of the smaller), as JPEG q92 of 320-640 px."""
    Image.MAX_IMAGE_PIXELS = None  # the packages' own 5K wallpapers
    photo = Image.open(path).convert("RGB")
    width, height = photo.size
    short = min(width, height)
    boxes: List[Tuple[int, int, int, int]] = []

    def overlap(a, b):
        w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return w * h

    for _ in range(5000):
        if len(boxes) >= count:
            break
        side, aspect = rng.uniform(0.18, 0.45) * short, rng.uniform(0.6, 1.7)
        w, h = int(side * aspect ** 0.5), int(side / aspect ** 0.5)
        if w >= width or h >= height:
            continue
        x, y = rng.randrange(width - w), rng.randrange(height - h)
        box = (x, y, x + w, y + h)
        if any(overlap(box, o) > 0.25 * min(w * h, (o[2] - o[0]) * (o[3] - o[1])) for o in boxes):
            continue
        boxes.append(box)
    crops = []
    for box in boxes:
        crop = photo.crop(box)
        side = rng.randint(320, 640)
        crop.thumbnail((side, side), Image.Resampling.LANCZOS)
        crops.append(_encoded(crop, "JPEG", quality=92))
    return crops


def photo_transformed(data: bytes, name: str, rng: random.Random) -> bytes:
    """The bytes a copy would be served as."""
    image = _decoded(data)
    w, h = image.size
    if name == "jpeg_q40":
        return _encoded(image, "JPEG", quality=40)
    if name == "webp_q70":
        return _encoded(image, "WEBP", quality=70)
    if name == "thumb_0.3":
        small = image.resize((round(w * 0.3), round(h * 0.3)), Image.Resampling.LANCZOS)
        return _encoded(small, "JPEG", quality=75)
    if name == "flip_jpeg":
        return _encoded(ImageOps.mirror(image), "JPEG", quality=75)
    if name == "rotate_3":
        out = image.rotate(3, resample=Image.Resampling.BICUBIC)
    elif name == "letterbox_10":
        pad = round(h * 0.1)
        out = Image.new("RGB", (w, h + 2 * pad))
        out.paste(image, (0, pad))
    elif name == "watermark":
        out = image.copy()
        size = max(12, h // 16)
        ImageDraw.Draw(out).text((w - size * 7, h - size - 8), "(c) photo", fill=(255, 255, 255),
                                 font=_font(size))
    elif name.startswith("resize_"):
        f = float(name[7:])
        out = image.resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC)
    elif name.startswith("contrast_"):
        out = ImageEnhance.Contrast(image).enhance(1 + int(name[9:]) / 100)
    elif name.startswith("bright_"):
        out = ImageEnhance.Brightness(image).enhance(1 + int(name[7:]) / 100)
    else:
        out = transformed(image, name.replace("flip_jpeg", "flip"), rng.randrange(2 ** 30))
    return _encoded(out, "PNG", compress_level=1)  # lossless: the transform is all that changed


def _photo_job(args) -> List[Tuple[int, str, Dict]]:
    """Hashed records (the pipeline's hash_record) of one base and its copies, for each rule."""
    from paircurate.transforms.dedup import hash_record
    from paircurate.transforms.schema import new_record

    base_id, data, seed, configs = args
    rng = random.Random(seed)
    images = [("base", data)] + [(name, photo_transformed(data, name, rng)) for name in PHOTO_TRANSFORMS]
    out = []
    for variant, raw in images:
        image = _decoded(raw)
        info = information(image)
        hashed = {}
        for label, config in configs.items():
            record = new_record(f"{base_id:05d}-{variant}", "http://x", "c", "s", 0, {})
            record.update(raw=raw, image=b"-", original_width=image.width, original_height=image.height)
            hashed[label] = hash_record(record, config)
            hashed[label]["_information"] = info
        out.append((base_id, variant, hashed))
    return out


def photo_rules():
    """The rules compared: the old one (exact-only below information 4.0, no verification) and the default."""
    from paircurate.transforms.dedup import DedupConfig

    old = DedupConfig()
    for name, value in OLD_RULE.items():
        setattr(old, name, value)
    return {"old": old, "default": DedupConfig()}


#: The rule before verification (issue 12): what DedupConfig used to default to.
OLD_RULE = {"min_information": 4.0, "smooth_below": 0.0, "flips": False, "verify": False}


def build_photographs(per_photo: int, workers: int = 2, seed: int = 0, install: bool = True,
                      files: List[str] = None, bases: Optional[int] = None, rules=None):
    """Hashed rows of every base (or of a fixed seeded sample of ``bases`` of them) and its copies."""
    rng = random.Random(seed)
    jobs = []
    rules = rules or photo_rules()
    for path in files or photo_files(install):
        for crop in photo_crops(path, per_photo, rng):
            jobs.append((len(jobs), crop, rng.randrange(2 ** 30), rules))
    if bases is not None and bases < len(jobs):
        jobs = sorted(random.Random(seed + 1).sample(jobs, bases), key=lambda job: job[0])
    if workers <= 1:
        results = list(map(_photo_job, jobs))
    else:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(_photo_job, jobs, chunksize=2)
    return [row for rows in results for row in rows], rules


def _oracles():
    """tests/oracles.py: the in-memory references the tests check the pipeline against."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "oracles.py")
    spec = importlib.util.spec_from_file_location("oracles", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule_records(rows, label: str, config) -> List[Dict]:
    """The hashed records of one rule; the old rule leaves images under its min_information exact-only."""
    records = [hashed[label] for _, _, hashed in rows]
    if label == "old":
        records = [dict(r, near_signature="") if r["low_information"] else r for r in records]
    return records


def photo_clusters(records: List[Dict], config) -> Dict[str, str]:
    """uid -> cluster id, deciding as the pipeline does (exact groups, then near pairs), in memory."""
    from paircurate.transforms.dedup import near_edges, record_signature

    connected_components = _oracles().connected_components

    sigs = [record_signature(r) for r in records]
    edges = []
    by_sha: Dict[str, str] = {}
    for sig in sigs:
        if config.exact and sig.image_sha256 in by_sha:
            edges.append((by_sha[sig.image_sha256], sig.uid))
        by_sha.setdefault(sig.image_sha256, sig.uid)
    if config.near:
        edges.extend(near_edges(sigs, config))
    return connected_components([s.uid for s in sigs], edges)


#: Information bands the figures are split by: flat (under FLAT_BELOW), smooth, textured.
FLAT_BELOW = 0.75
BANDS = ("flat", "smooth", "textured")


def band_of(info: float) -> str:
    return "flat" if info < FLAT_BELOW else "smooth" if info < SMOOTH_BELOW else "textured"


def evaluate_photographs(rows, rules) -> Dict[str, Dict]:
    out = {}
    for label, config in rules.items():
        records = rule_records(rows, label, config)
        cluster = photo_clusters(records, config)
        family = {r["uid"]: fam for (fam, _, _), r in zip(rows, records)}
        families_in: Dict[str, set] = {}
        for uid, c in cluster.items():
            families_in.setdefault(c, set()).add(family[uid])
        base_info = {r["uid"].split("-")[0]: r["_information"] for (_, variant, _), r in zip(rows, records)
                     if variant == "base"}
        recall, recall_above, recall_band = {}, {}, {}
        for name in PHOTO_TRANSFORMS:
            copies = [r for (_, variant, _), r in zip(rows, records) if variant == name]
            found = np.array([cluster[r["uid"]] == cluster[r["uid"].split("-")[0] + "-base"]
                              for r in copies])
            info = np.array([base_info[r["uid"].split("-")[0]] for r in copies])
            above = info >= config.min_information
            recall[name] = float(found.mean())
            recall_above[name] = float(found[above].mean()) if above.any() else float("nan")
            bands = np.array([band_of(i) for i in info])
            recall_band[name] = {band: float(found[bands == band].mean()) if (bands == band).any()
                                 else float("nan") for band in BANDS}
        bases = [r for (_, variant, _), r in zip(rows, records) if variant == "base"]
        merged = np.array([len(families_in[cluster[r["uid"]]]) > 1 for r in bases])
        bands = np.array([band_of(r["_information"]) for r in bases])
        smooth = np.array([r["_information"] < SMOOTH_BELOW for r in bases])
        out[label] = {"recall": recall, "recall_above": recall_above, "recall_band": recall_band,
                      "merged": float(merged.mean()),
                      "merged_textured": float(merged[~smooth].mean()) if (~smooth).any() else 0.0,
                      "merged_smooth": float(merged[smooth].mean()) if smooth.any() else 0.0,
                      "merged_band": {band: float(merged[bands == band].mean()) if (bands == band).any()
                                      else float("nan") for band in BANDS},
                      "band_share": {band: float((bands == band).mean()) for band in BANDS},
                      "smooth_share": float(smooth.mean()), "bases": len(bases),
                      "low_information": float(np.mean([r["low_information"] for r in bases]))}
    return out


def information_of(hashed: Dict[str, Dict]) -> float:
    return next(iter(hashed.values()))["_information"]


def print_photographs(result: Dict[str, Dict]) -> None:
    labels = list(result)
    first = result[labels[0]]
    print(f"\n{first['bases']} bases (crops of photographs), {100 * first['smooth_share']:.1f}% smooth "
          f"(information < {SMOOTH_BELOW})")
    print("Recall: all bases / bases at or above the rule's min_information (the old rule: the others are "
          "exact-only; the default: the others are verified by the low-contrast rule)")
    print(f"  {'transform':14s} " + " ".join(f"{label:>17s}" for label in labels))
    for name in PHOTO_TRANSFORMS:
        print(f"  {name:14s} " + " ".join(f"{result[label]['recall'][name]:8.3f} "
                                          f"{result[label]['recall_above'][name]:8.3f}" for label in labels))
    for key, text in (("merged", "distinct bases wrongly merged"),
                      ("merged_textured", "  of them textured"), ("merged_smooth", "  of them smooth"),
                      ("low_information", "bases under min_information")):
        print(f"  {text:34s} " + " ".join(f"{100 * result[label][key]:16.2f}%" for label in labels))
    shares = ", ".join(f"{band} {100 * first['band_share'][band]:.1f}%" for band in BANDS)
    print(f"\nPer information band (flat < {FLAT_BELOW} <= smooth < {SMOOTH_BELOW} <= textured; "
          f"bases: {shares}): recall {'/'.join(BANDS)}")
    print(f"  {'transform':14s} " + " ".join(f"{label:>23s}" for label in labels))
    for name in PHOTO_TRANSFORMS:
        print(f"  {name:14s} " + " ".join(
            " ".join(f"{result[label]['recall_band'][name][band]:7.3f}" for band in BANDS)
            for label in labels))
    print(f"  {'wrongly merged':14s} " + " ".join(
        " ".join(f"{100 * result[label]['merged_band'][band]:6.2f}%" for band in BANDS)
        for label in labels))


def diagnose_photographs(rows, rules, label: str = "default") -> None:
    """Verification distances of missed copies (base vs copy) against the nearest distinct pairs, per band.

    A copy is missed when its cluster is not its base's.  Its distance here is
    the smallest verify_distance over the two images' entries (no candidate
    search: what verification would say if the search paired them).  The
    distinct side: for each base, the smallest distance to a base of another
    photograph's crop or of the same photograph (hard negatives), all pairs.
    """
    from paircurate.transforms.dedup import near_entries_of, record_signature
    from paircurate.transforms.phash import LOW_CONTRAST, verify_distance

    config = rules[label]
    records = rule_records(rows, label, config)
    cluster = photo_clusters(records, config)
    thumbs = {r["uid"]: [e[1][1:] for e in near_entries_of(record_signature(r))] for r in records}

    def distance(a: str, b: str) -> float:
        return min((verify_distance(x, y, bool((fx | fy) & LOW_CONTRAST))
                    for fx, x in thumbs[a] for fy, y in thumbs[b]), default=float("inf"))

    bases = [r for (_, variant, _), r in zip(rows, records) if variant == "base"]
    band = {r["uid"].split("-")[0]: band_of(r["_information"]) for r in bases}
    print(f"\nDiagnosis ({label}): verification distance of missed copies, per band and transform")
    missed: Dict[Tuple[str, str], List[float]] = {}
    for (_, variant, _), r in zip(rows, records):
        base_uid = r["uid"].split("-")[0] + "-base"
        if variant == "base" or variant not in ROBUST or cluster[r["uid"]] == cluster[base_uid]:
            continue
        missed.setdefault((band[r["uid"].split("-")[0]], variant), []).append(distance(base_uid, r["uid"]))
    for (b, variant), values in sorted(missed.items()):
        values = sorted(values)
        print(f"  {b:9s} {variant:14s} missed {len(values):3d}  verify " +
              " ".join(f"{v:.2f}" for v in values[:12]) + (" ..." if len(values) > 12 else ""))
    print("Nearest distinct base (smallest verification distance to any other base), quantiles per band")
    uids = [r["uid"] for r in bases]
    for b in BANDS:
        nearest = sorted(min(distance(u, v) for v in uids if v != u)
                         for u in uids if band[u.split("-")[0]] == b)
        if nearest:
            q = [nearest[min(len(nearest) - 1, int(p * len(nearest)))] for p in (0, 0.01, 0.05, 0.1, 0.5)]
            print(f"  {b:9s} n={len(nearest):3d}  min {q[0]:.2f}  1% {q[1]:.2f}  5% {q[2]:.2f}  "
                  f"10% {q[3]:.2f}  median {q[4]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=None,
                        help="generated mode: distinct bases (2000); photographs mode: a fixed seeded "
                             "sample of this many bases (default all)")
    parser.add_argument("--flat", type=int, default=200)
    parser.add_argument("--k", type=int, default=6, help="max_distance to report per transform")
    parser.add_argument("--min-information", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photographs", action="store_true", help="real photographs (see above)")
    parser.add_argument("--crops-per-photo", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0, help="photographs: another set of crops and copies")
    parser.add_argument("--only-default", action="store_true", help="photographs: skip the old rule")
    parser.add_argument("--diagnose", action="store_true",
                        help="photographs: verification distances of the missed copies and of the "
                             "nearest distinct bases, per information band")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get the photo packages")
    parser.add_argument("--cache", help="pickle of the hashed photographs: written, or read if it exists "
                        "(to try other verification tolerances without hashing again)")
    args = parser.parse_args(argv)
    start = time.time()
    if args.photographs:
        import os
        import pickle

        if args.cache and os.path.exists(args.cache):
            with open(args.cache, "rb") as handle:
                rows, rules = pickle.load(handle)
        else:
            rules = photo_rules()
            if args.only_default:
                rules = {"default": rules["default"]}
            rows, rules = build_photographs(args.crops_per_photo, args.workers, seed=args.seed,
                                            install=not args.no_install, bases=args.bases, rules=rules)
            if args.cache:
                with open(args.cache, "wb") as handle:
                    pickle.dump((rows, rules), handle)
        print(f"{len(rows)} images hashed in {time.time() - start:.0f}s")
        rules = {label: config for label, config in photo_rules().items() if label in rules}
        print_photographs(evaluate_photographs(rows, rules))
        if args.diagnose:
            diagnose_photographs(rows, rules)
        print(f"\ntotal {time.time() - start:.0f}s")
        return
    args.bases = 2000 if args.bases is None else args.bases
    data = build(args.bases, args.flat, args.workers)
    images = sum(len(rows) for _, _, rows in data)
    print(f"{args.bases} structured + {args.flat} flat bases, {images} images hashed "
          f"in {time.time() - start:.0f}s")
    ks = list(range(0, 15))
    result = evaluate(data, ks, args.min_information, args.k)
    print_report(result, ks, args.k, args.min_information)
    print_sweep(result, args.k)
    print(f"\ntotal {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
