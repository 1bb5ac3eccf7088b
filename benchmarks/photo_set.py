"""Make a set of realistic stored images from a folder of photographs.

The CLIP stage sees the pipeline's resized outputs, so each image here is a
random crop of a source photograph put through the pipeline's own resizer
(image.* defaults: 256 px, border mode, JPEG quality 95).  With --large the
crops are instead re-encoded at 512-1024 px (quality 90), like the larger
images `paircurate score` may be fed.

    python benchmarks/photo_set.py SRC_DIR OUT_DIR --count 300 [--large]
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import random
import sys

from PIL import Image


def crops(path: str, count: int, rng: random.Random):
    """``count`` random crops (30-100% of the shorter side, aspect 0.6-1.6) of one photograph."""
    with Image.open(path) as image:
        image.draft("RGB", (2048, 2048))  # the sources are huge; crops need not be
        image = image.convert("RGB")
    width, height = image.size
    for _ in range(count):
        side = rng.uniform(0.3, 1.0) * min(width, height)
        aspect = rng.uniform(0.6, 1.6)
        w, h = min(width, int(side * aspect ** 0.5)), min(height, int(side / aspect ** 0.5))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        yield image.crop((left, top, left + w, top + h))


def encode(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of photographs (.jpg/.jpeg/.png)")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--large", action="store_true", help="512-1024 px crops instead of 256 px stored images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from paircurate.transforms.resize import ImageConfig, make_resizer

    sources = sorted(p for p in glob.glob(os.path.join(args.source, "*"))
                     if p.lower().endswith((".jpg", ".jpeg", ".png")))
    if not sources:
        parser.error(f"no photographs in {args.source}")
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    resizer = make_resizer(ImageConfig())
    per_source = -(-args.count // len(sources))
    written = 0
    for path in sources:
        for crop in crops(path, per_source, rng):
            if written == args.count:
                break
            if args.large:
                scale = rng.uniform(512, 1024) / max(crop.size)
                crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                                   Image.LANCZOS)
                data = encode(crop, 90)
            else:
                data, *_, error = resizer(io.BytesIO(encode(crop, 95)))
                if error:
                    continue
            with open(os.path.join(args.out, f"{written:05d}.jpg"), "wb") as handle:
                handle.write(data)
            written += 1
    print(f"{written} images from {len(sources)} photographs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
