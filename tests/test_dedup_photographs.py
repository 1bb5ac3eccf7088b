"""Near dedup end to end on real photographs: smooth ones (sky, water, sand) and their copies.

The photographs come from the Debian package mate-backgrounds (its nature/
folder), which .ci/run installs; elsewhere the test skips and says how to get
them.  Crops with little texture (information under dedup.smooth_below) are
the bases: the old rule left them to exact dedup only, so none of their
re-encoded copies was caught.
"""
from __future__ import annotations

import glob
import io
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance, ImageOps

from paircurate.config import load_config
from paircurate.imageserver import Route
from paircurate.run import run_pipeline
from paircurate.transforms.dedup import DedupConfig
from paircurate.transforms.phash import information

PHOTOS = "/usr/share/backgrounds/mate/nature/*.jpg"

pytestmark = pytest.mark.skipif(
    not glob.glob(PHOTOS), reason="needs the photographs of the Debian package mate-backgrounds "
                                  "(apt-get install mate-backgrounds; .ci/run installs it)")


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def smooth_crops(per_photo: int = 1, limit: int = 6):
    """The smoothest cell of a 5x4 grid of each photograph, where it is smooth: (name, image)."""
    smooth_below = DedupConfig().smooth_below
    crops = []
    for path in sorted(glob.glob(PHOTOS)):
        photo = Image.open(path).convert("RGB")
        w, h = photo.width // 5, photo.height // 4
        cells = []
        for j in range(4):
            for i in range(5):
                cell = photo.crop((i * w, j * h, (i + 1) * w, (j + 1) * h))
                cell.thumbnail((480, 480), Image.Resampling.LANCZOS)
                cells.append((information(cell), f"{os.path.basename(path)}:{i},{j}", cell))
        cells.sort(key=lambda c: c[0])
        crops += [(name, cell) for info, name, cell in cells[:per_photo] if info < smooth_below]
    return crops[:limit]


def test_smooth_photographs_copies_are_caught_and_distinct_ones_kept(tmp_path, image_server):
    bases = smooth_crops()
    assert len(bases) >= 4, "expected smooth crops in mate-backgrounds' photographs"
    rows = []
    for f, (name, image) in enumerate(bases):
        w, h = image.size
        variants = {
            "orig": _bytes(image, "JPEG", quality=92),
            "q40": _bytes(image, "JPEG", quality=40),
            "webp": _bytes(image, "WEBP", quality=70),
            "half": _bytes(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC), "JPEG", quality=85),
            # Darker, not brighter: +12% clips these near-white skies (see README, Deduplication).
            "darker": _bytes(ImageEnhance.Brightness(image).enhance(0.88), "JPEG", quality=90),
            "flip": _bytes(ImageOps.mirror(image), "JPEG", quality=85),
        }
        for variant, body in variants.items():
            path = f"/{variant}/{f}.jpg"
            image_server.routes[path] = Route(body)
            rows.append({"url": image_server.url(path), "caption": f"photo {name} {variant}",
                         "family": f, "variant": variant})
    table = tmp_path / "input.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), str(table))
    root = str(tmp_path / "out")
    config = load_config(overrides=[f"fetch.allowed_hosts=[{image_server.host_port}]",
                                    "clip.enabled=false"])
    run_pipeline(str(table), root, config)
    ledger = [r for part in sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
              for r in pq.read_table(part).to_pylist()]
    assert len(ledger) == len(rows)
    for f, (name, _) in enumerate(bases):
        family = [r for r in ledger if r["family"] == f]
        kept = [r for r in family if r["status"] == "ok"]
        # Each distinct smooth photograph keeps exactly one image: none merged into another.
        assert len(kept) == 1, (name, [(r["variant"], r["status"], r["error"]) for r in family])
        for r in family:
            if r is not kept[0]:
                assert r["status"] == "duplicate_near", (name, r["variant"], r["status"])
                assert r["duplicate_of"] == kept[0]["uid"], (name, r["variant"])
        flip = next(r for r in family if r["variant"] == "flip")
        assert kept[0]["variant"] == "flip" or flip["error"].startswith("near: flip")
    # None of them was left to exact dedup only: every image has near-search entries.
    assert all(r["near_signature"] for r in ledger)


def test_photographs_benchmark_runs_a_seeded_subset_and_splits_by_band():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "near_duplicate_quality.py")
    spec = importlib.util.spec_from_file_location("near_duplicate_quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    files = sorted(glob.glob(PHOTOS))[:2]
    rules = {"default": quality.photo_rules()["default"]}
    rows, _ = quality.build_photographs(4, workers=1, files=files, bases=3, rules=rules)
    again, _ = quality.build_photographs(4, workers=1, files=files, bases=3, rules=rules)
    bases = [hashed["default"]["uid"] for _, variant, hashed in rows if variant == "base"]
    assert len(bases) == 3 and len(rows) == 3 * (1 + len(quality.PHOTO_TRANSFORMS))
    assert bases == [hashed["default"]["uid"] for _, variant, hashed in again if variant == "base"]
    result = quality.evaluate_photographs(rows, rules)["default"]
    assert abs(sum(result["band_share"].values()) - 1) < 1e-9
    for name in quality.ROBUST:
        known = [v for v in result["recall_band"][name].values() if v == v]  # nan: no base in the band
        assert known and all(0 <= v <= 1 for v in known)
    assert result["recall"]["jpeg_q40"] == 1.0  # three textured or smooth crops: their re-encodes are found
