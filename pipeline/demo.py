"""`paircurate demo`: the whole pipeline, offline, on a sample the project makes itself.

The sample mixes good pairs with every common kind of bad row (duplicates,
broken and blocked URLs, non-images, corrupt files, short captions, opted-out
images) so that the summary shows each status at work.
"""
from __future__ import annotations

import io
import os
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from paircurate.imageserver import ImageServer, Route

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 40), "purple": (140, 50, 170), "orange": (245, 140, 30),
           "black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128),
           "teal": (30, 150, 150)}
SHAPES = ("circle", "square", "triangle", "stripes", "cross")
DEMO_MODEL_CONFIG = "paircurate-tiny"


def synthetic_image(seed: int, size: Optional[Tuple[int, int]] = None) -> Tuple[Image.Image, str]:
    """A structured image (shape on a textured background) and a caption that describes it."""
    rng = random.Random(seed)
    width, height = size or (rng.randint(200, 640), rng.randint(200, 640))
    fg_name, bg_name = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    noise = np.random.default_rng(seed).integers(0, 40, size=(height, width, 1), dtype=np.uint8)
    base = np.clip(np.array(COLOURS[bg_name], dtype=np.int16) + noise - 20, 0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    fg = COLOURS[fg_name]
    x0, y0 = rng.randint(0, width // 3), rng.randint(0, height // 3)
    x1, y1 = rng.randint(2 * width // 3, width), rng.randint(2 * height // 3, height)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fg)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fg)
    elif shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fg)
    elif shape == "stripes":
        step = rng.randint(8, 40)
        for x in range(0, width, 2 * step):
            draw.rectangle([x, 0, x + step, height], fill=fg)
    else:
        w = max(4, (x1 - x0) // 5)
        draw.rectangle([(x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1], fill=fg)
        draw.rectangle([x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w], fill=fg)
    # A few random marks so that no two images share a perceptual hash by accident.
    for _ in range(rng.randint(3, 8)):
        cx, cy, r = rng.randint(0, width), rng.randint(0, height), rng.randint(5, 40)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[rng.choice(sorted(COLOURS))])
    caption = f"a {fg_name} {shape} on a {bg_name} background"
    return image, caption


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def build_sample(server: ImageServer, n_images: int = 240, seed: int = 0) -> List[Dict[str, str]]:
    """Register the demo's routes on ``server``; return the input rows with expected statuses."""
    rng = random.Random(seed)
    rows: List[Dict[str, str]] = []

    def add(path: str, route: Route, caption: str, expect: str) -> None:
        server.routes[path] = route
        rows.append({"url": server.url(path), "caption": caption, "expect": expect})

    originals = []
    for i in range(n_images):
        image, caption = synthetic_image(seed * 100000 + i)
        body = encode(image)
        originals.append((image, body, caption))
        add(f"/img/{i}.jpg", Route(body), caption, "ok")
    for i in range(20):  # the same URL and caption listed twice
        rows.append(dict(rows[rng.randrange(n_images)]))
    for i in range(15):  # identical bytes under another URL
        _, body, caption = originals[rng.randrange(n_images)]
        add(f"/mirror/{i}.jpg", Route(body), caption + " (mirror)", "duplicate_exact")
    for i in range(10):  # resized and re-encoded copies
        image, _, caption = originals[i]
        copy = image.resize((image.width // 2, image.height // 2))
        add(f"/copy/{i}.jpg", Route(encode(copy, quality=70)), caption + " copy", "duplicate_near")
    for i in range(10):
        rows.append({"url": server.url(f"/missing/{i}.jpg"), "caption": "a picture that is gone",
                     "expect": "fetch_failed"})
    for i in range(5):
        add(f"/page/{i}.html", Route(b"<html><body>hello</body></html>", "text/html"),
            "a web page, not an image", "fetch_failed")
    for i in range(5):
        _, body, _ = originals[i]
        add(f"/corrupt/{i}.jpg", Route(body[:40] + b"\x00" * 200), "a corrupt picture file",
            "decode_failed")
    for i in range(5):
        add(f"/short/{i}.jpg", Route(originals[i][1]), "img", "caption_filtered")
    for i in range(2):
        add(f"/optout/{i}.jpg", Route(originals[i][1], headers=[("X-Robots-Tag", "noai")]),
            "a picture its publisher opted out", "disallowed")
    rows.append({"url": "http://169.254.169.254/latest/meta-data/", "caption": "cloud metadata endpoint",
                 "expect": "blocked_address"})
    rows.append({"url": "file:///etc/passwd", "caption": "a local file", "expect": "blocked_address"})
    rows.append({"url": "", "caption": "a row without a URL", "expect": "invalid_input"})
    rng.shuffle(rows)
    # After shuffling, the first listing of a repeated URL+caption is the one kept.
    seen = {}
    for row in rows:
        key = (row["url"], row["caption"])
        if key in seen:
            row["expect"] = "duplicate_input"
        else:
            seen[key] = True
            if row["expect"] == "duplicate_input":
                row["expect"] = "ok"
    return rows


def write_input(rows: List[Dict[str, str]], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
                      "expect": [r["expect"] for r in rows]})
    pq.write_table(table, path, row_group_size=100)


def demo_overrides(host_port: str, clip_available: bool) -> List[str]:
    overrides = [f"fetch.allowed_hosts=[{host_port}]", "fetch.timeout=10", "fetch.retries=1",
                 "output.samples_per_shard=100"]
    if clip_available:
        overrides += [f"clip.model_config={DEMO_MODEL_CONFIG}", "clip.pretrained=none",
                      "clip.device=cpu"]
    else:
        overrides += ["clip.enabled=false"]
    return overrides
