"""Decode and resize with img2dataset's Resizer, after a header check that stops decompression bombs."""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import apache_beam as beam

from paircurate.transforms.beam_util import ConcurrentRecordFn
from paircurate.transforms.schema import Status, is_live, mark
from paircurate.transforms.settings import AT_LEAST_ONE, NON_NEGATIVE, Bounds, ConfigError, setting


@dataclass
class ImageConfig:
    image_size: int = setting(256, Bounds(1, 65535))  # JPEG's largest side
    # img2dataset resize modes: no | keep_ratio | keep_ratio_largest | center_crop | border
    resize_mode: str = setting("border", choices=("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"))
    resize_only_if_bigger: bool = False
    encode_format: str = setting("jpg", choices=("jpg", "png", "webp"))
    encode_quality: int = setting(95, Bounds(0, 100))  # PNG: 0-9, checked below
    min_image_size: int = setting(0, NON_NEGATIVE)
    max_aspect_ratio: float = setting(math.inf, Bounds(1, allow_inf=True))  # larger side / smaller side
    # Images with more pixels than this are refused before decoding (decompression bombs).
    max_image_pixels: int = setting(100_000_000, AT_LEAST_ONE)
    # Decode/resize threads per worker (0: one per CPU core).
    threads: int = setting(0, NON_NEGATIVE)  # 0: one per CPU core

    def check(self) -> None:
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ConfigError("with image.encode_format png, image.encode_quality is the PNG "
                              "compression level and must be 0-9")


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


def _quiet_resizer_module() -> None:
    """Stop img2dataset's Resizer from redirecting file descriptors 1 and 2.

    Its SuppressStdoutStderr swaps the process-wide stdout/stderr descriptors
    around every image to hide decoder warnings; from several threads at once
    those swaps interleave and can leave the process writing to /dev/null.
    Decoder warnings on stderr are the lesser harm.
    """
    import contextlib

    from img2dataset import resizer as resizer_module

    resizer_module.SuppressStdoutStderr = contextlib.nullcontext


class _ResizeFn(ConcurrentRecordFn):
    """Decodes and resizes on a thread pool: OpenCV releases the GIL while it works."""

    failure_status = Status.DECODE_FAILED
    namespace = "resize"

    def __init__(self, config: ImageConfig, progress: Optional[str] = None):
        super().__init__(config.threads or os.cpu_count() or 1, progress)
        self._config = config

    def setup(self):
        from PIL import Image

        super().setup()
        # Pillow's own bomb guard, set deliberately: refuse (not warn) beyond our limit.
        Image.MAX_IMAGE_PIXELS = self._config.max_image_pixels // 2
        _quiet_resizer_module()
        self._resizer = make_resizer(self._config)

    def work(self, record):
        decode_and_resize(record, self._resizer, self._config)


class DecodeAndResize(beam.PTransform):
    def __init__(self, config: ImageConfig, progress: Optional[str] = None):
        super().__init__()
        self._config = config
        self._progress = progress

    def expand(self, records):
        return records | "Resize" >> beam.ParDo(_ResizeFn(self._config, self._progress))
