"""Decode and resize with img2dataset's Resizer, after a header check that stops decompression bombs."""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Optional, Tuple

import apache_beam as beam

from paircurate.config import ImageConfig
from paircurate.schema import Status, is_live, mark

# albumentations (imported by img2dataset) asks PyPI for its latest version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

#: Resizer's error strings that mean "decoded fine, but outside the size rules".
_SIZE_ERRORS = {"image too small": "too_small", "image area too large": "area_too_large",
                "aspect ratio too large": "aspect_ratio"}


def probe_size(raw: bytes) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height), None) from the image header alone, or (None, error).

    Reading only the header lets a decompression bomb (a small file that
    decodes to billions of pixels) be refused before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.size, None
    except Image.DecompressionBombError as exc:
        return None, f"decompression_bomb: {exc}"[:200]
    except UnidentifiedImageError:
        return None, "unidentified: not a known image format"
    except Exception as exc:  # truncated headers and the like
        return None, f"corrupt: {type(exc).__name__}"


def make_resizer(config: ImageConfig):
    from img2dataset.resizer import Resizer

    return Resizer(image_size=config.image_size, resize_mode=config.resize_mode,
                   resize_only_if_bigger=config.resize_only_if_bigger,
                   encode_quality=config.encode_quality, encode_format=config.encode_format,
                   min_image_size=config.min_image_size,
                   max_aspect_ratio=config.max_aspect_ratio)


def decode_and_resize(record: Dict[str, Any], resizer, config: ImageConfig) -> Dict[str, Any]:
    """Fill image, width/height and original size, or mark decode_failed / size_filtered."""
    if not is_live(record):
        return record
    raw = record.get("raw")
    if not raw:
        return mark(record, Status.DECODE_FAILED, "empty")
    size, error = probe_size(raw)
    if error:
        return mark(record, Status.DECODE_FAILED, error)
    width, height = size
    if width * height > config.max_image_pixels:
        return mark(record, Status.DECODE_FAILED,
                    f"decompression_bomb: {width}x{height} > {config.max_image_pixels} pixels")
    image, out_w, out_h, orig_w, orig_h, error = resizer(io.BytesIO(raw))
    if error:
        if error in _SIZE_ERRORS:
            record["original_width"], record["original_height"] = width, height
            return mark(record, Status.SIZE_FILTERED, _SIZE_ERRORS[error])
        return mark(record, Status.DECODE_FAILED, f"corrupt: {error}"[:200])
    record.update(image=image, width=out_w, height=out_h, original_width=orig_w,
                  original_height=orig_h, image_format=config.encode_format)
    return record


class _ResizeFn(beam.DoFn):
    def __init__(self, config: ImageConfig):
        self._config = config
        self._resizer = None

    def setup(self):
        from PIL import Image

        # Pillow's own bomb guard, set deliberately: refuse (not warn) beyond our limit.
        Image.MAX_IMAGE_PIXELS = self._config.max_image_pixels // 2
        self._resizer = make_resizer(self._config)

    def process(self, record):
        if is_live(record):
            record = decode_and_resize(record, self._resizer, self._config)
            beam.metrics.Metrics.counter("resize", record["status"]).inc()
        yield record


class DecodeAndResize(beam.PTransform):
    def __init__(self, config: ImageConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        return records | "Resize" >> beam.ParDo(_ResizeFn(self._config))
