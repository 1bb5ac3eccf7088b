"""Loading an open_clip model and scoring image-text pairs with it (no Beam here).

Weights are resolved before open_clip is called: a tag's file is looked up in
the local caches first, so a cached model loads without touching the network,
and a missing one fails at once with a ClipModelError that says what to pass
instead (open_clip itself would try to download, and offline that can hang).

Two image paths (clip.preprocess):

* exact: open_clip's own image transform.  The PIL steps of the model's
  ``preprocess_val`` (resize, crop, RGB) run on CPU threads, and the remaining
  ToTensor + Normalize (x / 255, then (x - mean) / std, as one affine) run on
  the same threads on a CPU, or on a GPU on uint8 batches (4x fewer bytes to
  move).  Scores match open_clip's within 1e-4.
* fast: the same geometry (torchvision's resize arithmetic, centre crop) with
  less CPU per image.  On a GPU, JPEGs are decoded there in batches (nvJPEG
  through torchvision) and resized there, in batches of equal-sized images.
  On a CPU, each preprocess thread takes an image all the way: decode
  (libjpeg-turbo through torchvision into a tensor, or PIL scaling a JPEG down
  in the DCT domain when it is at least four times the size the model needs),
  the antialiased resize in uint8 (PIL's filter, in torch), and ToTensor +
  Normalize as one affine written straight into the batch's model input
  (channels last in memory, so every pass is contiguous), while the image is
  still in the thread's cache.  Torch's ops on these threads run on them alone
  (single_threaded_ops).  Inputs under PER_IMAGE_MIN_PIXELS are decoded on the
  threads and resized and normalised per batch, which costs them less.
  Images that are neither RGB nor greyscale take the exact path.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np

from paircurate.transforms.clip_tokenize import fast_tokenizer
from paircurate.transforms.settings import AT_LEAST_ONE, NON_NEGATIVE, Bounds, ConfigError, setting

#: clip.tags' default: zero-shot tags in the spirit of LAION-400M's CLIP-based tagging (README,
#: "Tags and heads"): as many positive as negative prompts, so neither side starts ahead.
DEFAULT_TAGS: Dict[str, Any] = {
    "unsafe": {"positive": ["a photo containing nudity", "an explicit sexual image",
                            "a pornographic picture", "a photo of graphic violence and gore"],
               "negative": ["a safe for work photo", "a photo of people wearing clothes",
                            "an ordinary everyday picture", "a family friendly image"]},
    "watermark": {"positive": ["a photo with a watermark", "an image with a text overlay logo",
                               "a stock photo with a watermark across it"],
                  "negative": ["a photo without a watermark", "a clean image with no text or logo",
                               "a photo with no overlay"]},
}


@dataclass
class ClipConfig:
    enabled: bool = True
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    # JSON model config for custom architectures (a path, or a file name in configs/models).
    model_config: Optional[str] = None
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    precision: str = setting("auto", choices=("auto", "fp32", "fp16", "bf16"))
    batch_size: int = setting(256, AT_LEAST_ONE)
    min_score: Optional[float] = setting(None, Bounds(-1, 1))  # a cosine similarity
    keep_fraction: Optional[float] = setting(None, Bounds(0, 1, low_open=True))
    save_embeddings: bool = False
    # Threads that decode and resize images for the model (0: one per CPU core).
    preprocess_threads: int = setting(0, NON_NEGATIVE)  # 0: one per CPU core
    # exact: open_clip's own PIL transform (scores match open_clip within 1e-4) |
    # fast: libjpeg-turbo / nvJPEG decoding and torch's antialiased resize (measured
    # score difference at most 0.01; README "CLIP scoring and filtering").
    preprocess: str = "fast"
    # Where open_clip / Hugging Face weights are looked up (None: their default caches).
    cache_dir: Optional[str] = None
    # Serve one model per machine to all worker processes (Beam multi_process_shared).
    share_model_across_processes: bool = False
    # Zero-shot tags: name -> {positive: [prompts], negative: [prompts]}; each scored pair gets
    # tag_<name>, the softmax probability of the positive prompts ({}: no tags).
    tags: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_TAGS))
    # Tag filters: name -> highest probability kept; above it -> tag_filtered.
    tag_max: Dict[str, float] = field(default_factory=dict)
    # Trained heads on the image embedding: name -> {path, activation: none|sigmoid, hidden: relu|none}.
    heads: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        device = self.device
        if not (device in ("auto", "cpu", "cuda")
                or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError(f"clip.device={device!r}: must be auto, cpu, cuda or cuda:N")
        if self.min_score is not None and self.keep_fraction is not None:
            raise ConfigError("set clip.min_score or clip.keep_fraction, not both")
        from paircurate.transforms.clip_tags import check_config as check_tags_and_heads

        check_tags_and_heads(self)


_LOG = logging.getLogger(__name__)

#: Where shipped model configs (configs/models) are: inside the installed package, whose configs/
#: lies beside transforms/, as the repository's configs/ lies beside transforms/ in a checkout.
CONFIG_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")]

RANDOM_WEIGHTS = ("", "none", "random")
HF_HOST = "huggingface.co"
#: Seconds allowed to find out whether a weights host can be reached at all.
PROBE_TIMEOUT = 3.0
OFFLINE_HINT = ("pass a local checkpoint with clip.pretrained=/path/to/weights.safetensors (or .bin/.pt), "
                "put the file in the cache (clip.cache_dir), or use a small architecture with random "
                "weights: clip.model_config=paircurate-tiny clip.pretrained=none")


class ClipModelError(RuntimeError):
    """The model cannot be loaded as configured; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """What to hand open_clip: a model name and a local weights file (or a tag it may download)."""
    name: str                       # open_clip architecture name, or a local-dir:/hf-hub: id
    pretrained: Optional[str]       # local file, a tag to download, or None (random weights)
    source: str                     # random | file | cache | download | local-dir | hf-hub
    preprocess: Dict[str, Any]      # the tag's preprocessing (mean/std/...) when loading a cached file
    description: Dict[str, Any]


# ---------------------------------------------------------------------------
# resolution: pure-ish functions that touch only the local filesystem


def is_random(pretrained: Optional[str]) -> bool:
    return (pretrained or "").strip().lower() in RANDOM_WEIGHTS


def find_model_config(value: str) -> str:
    """A model config JSON: a path as given, or a name (with or without .json) in configs/models."""
    if os.path.isfile(value):
        return value
    name = value if value.endswith(".json") else value + ".json"
    for folder in CONFIG_DIRS:
        path = os.path.join(folder, "models", name)
        if os.path.isfile(path):
            return path
    shipped = sorted({f[:-5] for d in CONFIG_DIRS if os.path.isdir(os.path.join(d, "models"))
                      for f in os.listdir(os.path.join(d, "models")) if f.endswith(".json")})
    raise ClipModelError(f"clip.model_config {value!r}: no such file, and not a shipped model config "
                         f"(shipped: {', '.join(shipped) or 'none'})")


def register_architecture(config: ClipConfig) -> str:
    """The open_clip architecture name for the config, registering a JSON config if one is named."""
    import open_clip

    if config.model_config:
        path = find_model_config(config.model_config)
        open_clip.add_model_config(path)
        return os.path.splitext(os.path.basename(path))[0]
    name = config.model
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return name
    try:  # a shipped config may be named as the model directly
        path = find_model_config(name)
    except ClipModelError:
        raise ClipModelError(f"clip.model {name!r} is not an open_clip architecture; use one of "
                             "open_clip.list_models() (e.g. ViT-B-32, ViT-L-14), an hf-hub: id, "
                             "or clip.model_config for a custom JSON config") from None
    open_clip.add_model_config(path)
    return name


def _hub_cached(repo_id: str, filenames: Sequence[str], cache_dir: Optional[str]) -> Optional[str]:
    """The first of ``filenames`` already in the local Hugging Face cache (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception:  # malformed ids and the like: treat as not cached
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _weights_alternatives(filename: str) -> List[str]:
    """open_clip prefers a .safetensors twin of a .bin/.pth file; look for both."""
    names = []
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return names + [filename]


def cached_tag_file(tag_cfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[str]:
    """The local file of a pretrained tag, if either cache open_clip uses already holds it."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # as open_clip splits it; "org/name/" -> default file
        filename = filename or "open_clip_pytorch_model.bin"
        found = _hub_cached(repo_id, _weights_alternatives(filename), cache_dir)
        if found:
            return found
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds (DNS included).

    getaddrinfo has no timeout of its own, so the attempt runs in a daemon thread.
    """
    result: List[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE) in this process."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return True


def go_offline() -> None:
    """Switch Hugging Face downloads off for the rest of the process (both the env and the live flag)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def can_download(host: str, probe: Callable[[str], bool] = reachable) -> bool:
    """Whether a download from ``host`` may be tried: not offline, and the host answers.

    Only called when a file is missing locally, so the probe costs nothing a
    download would not have cost anyway.  An unreachable hub switches the
    process offline, so that nothing later waits on it either.
    """
    if hub_offline():
        return False
    if probe(host):
        return True
    go_offline()
    return False


def _missing(what: str, where: str) -> ClipModelError:
    return ClipModelError(f"CLIP weights {what} are not in the local cache ({where}) and cannot be "
                          f"downloaded (offline or no network); {OFFLINE_HINT}")


def resolve_model(config: ClipConfig, probe: Callable[[str], bool] = reachable) -> ResolvedModel:
    """Decide where the weights come from, without loading anything; fail fast and clearly."""
    import open_clip

    name = register_architecture(config)
    pretrained = (config.pretrained or "").strip()
    cache = config.cache_dir
    where = cache or "~/.cache/huggingface, ~/.cache/clip"
    desc = {"model": name, "pretrained": "none" if is_random(pretrained) else pretrained,
            "model_config": config.model_config}

    if name.startswith("local-dir:"):
        return ResolvedModel(name, None, "local-dir", {}, dict(desc, pretrained=name))
    if name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:"):]
        config_file = _hub_cached(repo_id, ["open_clip_config.json"], cache)
        weights = _hub_cached(repo_id, _weights_alternatives("open_clip_pytorch_model.bin"), cache)
        if config_file and weights and os.path.dirname(config_file) == os.path.dirname(weights):
            local = "local-dir:" + os.path.dirname(config_file)
            return ResolvedModel(local, None, "cache", {}, dict(desc, pretrained=name))
        if not can_download(HF_HOST, probe):
            raise _missing(f"for {name}", where)
        return ResolvedModel(name, None, "hf-hub", {}, dict(desc, pretrained=name))

    if is_random(pretrained):
        return ResolvedModel(name, None, "random", {}, desc)
    if "://" in pretrained:  # gs://, s3://: copy through Beam's FileSystems once per machine
        return ResolvedModel(name, fetch_remote_checkpoint(pretrained, cache), "file", {}, desc)
    if os.path.isfile(pretrained):
        return ResolvedModel(name, pretrained, "file", {}, desc)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ClipModelError(
            f"clip.pretrained {pretrained!r} is neither a known tag of {name} "
            f"(known: {', '.join(tags) or 'none'}) nor an existing file; "
            "use clip.pretrained=none for random weights")
    found = cached_tag_file(tag_cfg, cache)
    if found:
        return ResolvedModel(name, found, "cache", preprocess_of_tag(tag_cfg), desc)
    host = HF_HOST if tag_cfg.get("hf_hub") else (urlparse(tag_cfg.get("url", "")).hostname or HF_HOST)
    if not can_download(host, probe):
        raise _missing(f"for {name}/{pretrained}", where)
    return ResolvedModel(name, pretrained, "download", {}, desc)


def preprocess_of_tag(tag_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing a tag prescribes (what open_clip merges in when it loads the tag itself)."""
    keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
    return {k: tag_cfg[k] for k in keys if k in tag_cfg}


def fetch_remote_checkpoint(path: str, cache_dir: Optional[str]) -> str:
    """Copy a gs:// / s3:// checkpoint to a local cache file (complete, then renamed)."""
    import hashlib

    from apache_beam.io.filesystems import FileSystems

    from paircurate.transforms.files import write_atomically

    folder = os.path.join(cache_dir or os.path.expanduser("~/.cache/paircurate"), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
    local = os.path.join(folder, digest + "-" + os.path.basename(path))
    if os.path.isfile(local):
        return local
    if not FileSystems.exists(path):
        raise ClipModelError(f"clip.pretrained {path!r}: no such file")

    def copy(dst) -> None:
        with FileSystems.open(path) as src:
            while True:
                chunk = src.read(16 << 20)
                if not chunk:
                    break
                dst.write(chunk)

    write_atomically(local, copy, temp=f"{local}.{os.getpid()}.incomplete")
    return local


def model_description(config: ClipConfig) -> Dict[str, Any]:
    """What stats.json should say about the model (no weights are loaded)."""
    desc: Dict[str, Any] = {
        "model": config.model_config and os.path.splitext(os.path.basename(config.model_config))[0]
        or config.model,
        "pretrained": "none" if is_random(config.pretrained) else config.pretrained,
        "model_config": config.model_config,
        "precision": config.precision,
        "batch_size": config.batch_size,
        "preprocess": config.preprocess,
        "filter": ("min_score" if config.min_score is not None
                   else "keep_fraction" if config.keep_fraction is not None else "none"),
        "min_score": config.min_score,
        "keep_fraction": config.keep_fraction,
        "tags": {name: dict(spec) for name, spec in config.tags.items()},
        "tag_max": dict(config.tag_max),
        "heads": {name: dict(spec) if isinstance(spec, dict) else {"path": spec}
                  for name, spec in config.heads.items()},
    }
    return desc


# ---------------------------------------------------------------------------
# the loaded model


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipModelError(f"clip.device={device} but no CUDA device is available; use clip.device=cpu")
    return device


def autocast_dtype(precision: str, device: str):
    """The autocast dtype: fp16 on CUDA by default, none (fp32) on CPU."""
    import torch

    kind = device.split(":")[0]
    if precision == "auto":
        precision = "fp16" if kind == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if kind != "cuda":
            raise ClipModelError("clip.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return torch.float16
    raise ClipModelError("clip.precision must be one of auto, fp32, fp16, bf16")


def split_transform(preprocess) -> Optional[Tuple[Callable, Tuple[float, ...], Tuple[float, ...]]]:
    """(PIL steps, mean, std) when ``preprocess`` ends in ToTensor + Normalize; else None."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    for i, step in enumerate(steps):
        if isinstance(step, T.ToTensor):
            rest = steps[i + 1:]
            if len(rest) == 1 and isinstance(rest[0], T.Normalize):
                return T.Compose(steps[:i]), tuple(rest[0].mean), tuple(rest[0].std)
            return None
    return None


PREPROCESS_MODES = ("exact", "fast")
#: The fast path decodes a JPEG no smaller than this many times the size it is resized to.
DRAFT_HEADROOM = 2
#: On a CPU, the fast path prepares each image on its thread up to the normalised model input
#: (per-image Python steps, no float pass over the batch) for model inputs of at least this many
#: pixels; smaller ones (paircurate-tiny's 64 px) cost less resized and normalised per batch.
PER_IMAGE_MIN_PIXELS = 96 * 96


@dataclasses.dataclass(frozen=True)
class FastResize:
    """The geometry of an open_clip eval transform that the fast path reproduces.

    mode "shortest": resize the shorter side to size[0] (torchvision's Resize
    with an int), then centre-crop ``size``; "squash": resize to ``size``.
    ``size`` is (height, width).
    """
    mode: str
    size: Tuple[int, int]
    interpolation: str  # bicubic | bilinear

    def resized(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) after the resize, before the crop: torchvision's arithmetic exactly."""
        if self.mode == "squash":
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def crop_box(self, height: int, width: int) -> Tuple[int, int]:
        """(top, left) of torchvision's CenterCrop of ``size`` from a (height, width) image."""
        crop_h, crop_w = self.size
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def fast_resize_of(preprocess_cfg: Dict[str, Any]) -> Optional[FastResize]:
    """The fast path's plan for a model's preprocess config; None when it cannot reproduce it."""
    size = preprocess_cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear") or preprocess_cfg.get("mode", "RGB") != "RGB":
        return None
    if mode == "squash" or (mode == "shortest" and size[0] == size[1]):
        return FastResize(mode, size, interpolation)
    return None


def decode_for_resize(data: bytes, plan: FastResize) -> Optional[Tuple[np.ndarray, Tuple[int, int]]]:
    """(RGB uint8 HWC pixels, (height, width) to resize them to), or None for the exact path.

    A JPEG at least four times the resized size is decoded at 1/2, 1/4 or 1/8
    scale, never below twice the resized size: the antialiased resize still
    does the filtering (scaling all the way down in the DCT domain doubled the
    score difference on photographs), and the decode does a fraction of the
    work.  Modes other than RGB and greyscale (palette, alpha, CMYK, 16-bit)
    are left to the exact path, whose PIL steps treat them in their own ways.
    """
    decoded = _pil_pixels(data, plan)
    if decoded is None:
        return None
    pixels, (height, width) = decoded
    return pixels.numpy(), plan.resized(width, height)


def _pil_pixels(data: bytes, plan: FastResize):
    """(uint8 RGB pixels as an HWC tensor, the image's (height, width)) decoded by PIL, a JPEG
    at reduced scale where plan allows (see decode_for_resize); None for modes other than
    RGB and greyscale."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
        target = plan.resized(width, height)
        image.draft(image.mode, (DRAFT_HEADROOM * target[1], DRAFT_HEADROOM * target[0]))  # JPEG only
        if image.mode != "RGB":
            image = image.convert("RGB")
        # One copy of the decoded bytes (np.array(image) packs them twice: 45 us a 128 px image).
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(image.height, image.width, 3), (height, width)


#: Start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC), whose segment gives the image size.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(height, width, components, bits per sample) from a JPEG's frame header; None when
    the bytes are not a JPEG or no frame header comes before the image data.

    Walks the marker segments only (a few microseconds; PIL's header parser, in
    Python, reads the quantisation tables too).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
        elif marker in _FRAME_MARKERS:
            if i + 10 > n:
                return None
            return ((data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], data[i + 9], data[i + 4])
        elif marker in (0xD9, 0xDA):  # end of image, or image data before any frame header
            return None
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def drafts(width: int, height: int, target: Tuple[int, int]) -> bool:
    """Whether PIL's draft mode decodes a JPEG of this size at a reduced scale for ``target``
    (height, width): when it is at least DRAFT_HEADROOM * 2 times the target both ways."""
    return min(width // (DRAFT_HEADROOM * target[1]), height // (DRAFT_HEADROOM * target[0])) >= 2


def decode_pixels(data: bytes, plan: FastResize):
    """(uint8 RGB pixels as a CHW tensor, the image's (height, width)), or None for the exact path.

    An 8-bit RGB or greyscale JPEG is decoded by libjpeg-turbo through torchvision into a
    tensor (no PIL image, no copy; about 0.23 core-ms for a 256 px JPEG where PIL takes
    0.38), unless it is large enough for PIL to decode it at 1/2, 1/4 or 1/8 scale
    (decode_for_resize).  Both decoders give the same pixels; what torchvision cannot
    read goes to PIL, which reads it or says what is wrong with it.  Other formats go
    to PIL; modes other than RGB and greyscale to the exact path.
    """
    header = jpeg_header(data)
    if header is not None:
        height, width, components, bits = header
        if components in (1, 3) and bits == 8 and not drafts(width, height, plan.resized(width, height)):
            pixels = _decode_jpeg(data)
            if pixels is not None:
                return pixels, (height, width)
    decoded = _pil_pixels(data, plan)
    if decoded is None:
        return None
    pixels, original = decoded
    return pixels.permute(2, 0, 1), original


def _decode_jpeg(data: bytes):
    """uint8 RGB CHW pixels (HWC in memory) decoded by torchvision; None where it fails, or
    where torchvision has no JPEG decoder (0.29 deprecates its image decoders): PIL then."""
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def resize_image(pixels, original: Tuple[int, int], plan: FastResize):
    """uint8 CHW pixels of an image of ``original`` (height, width) -> uint8 CHW of ``plan.size``
    (a view of the resized image), in uint8 with torch's antialiased kernels."""
    return resize_batch(one_image_batch(pixels), plan.resized(original[1], original[0]), plan)[0]


def one_image_batch(pixels):
    """uint8 CHW pixels -> a 1CHW view, HWC in memory (channels last) with a whole image's
    batch stride, copying only when they are not HWC in memory.

    Channels last is the kernels' SIMD path (any other layout takes a generic one,
    several times slower).  The batch stride matters too, although one image never
    uses it: ``unsqueeze(0)`` of a CHW view gives a stride of 3, and then the uint8
    kernel copies the image first (0.23 core-ms for a 256 px photograph against 0.16).
    """
    hwc = pixels.permute(1, 2, 0)
    return (hwc if hwc.is_contiguous() else hwc.contiguous()).unsqueeze(0).permute(0, 3, 1, 2)


def normalise_into(out, pixels, scale, shift) -> None:
    """out = pixels * scale + shift per channel: ToTensor and Normalize as one affine, one image.

    out: float32 CHW, HWC in memory (an image of the channels-last model input);
    pixels: uint8 CHW, any strides (HWC in memory, as the decoders and the resize
    give them, is the fast case); scale, shift: float32 (W * C,), the channels'
    values repeated along a row (affine_row).  In HWC every pass is contiguous and
    vectorised: 0.06 core-ms for 224 px into a batch buffer that is not in the
    cache, where numpy's casting multiply and add into CHW took 0.14.  Run on a
    preprocess thread whose torch ops stay in that thread (single_threaded_ops).
    """
    rows = out.permute(1, 2, 0)
    rows.copy_(pixels.permute(1, 2, 0))
    rows = rows.view(rows.shape[0], -1)
    rows.mul_(scale).add_(shift)


def affine_row(values, width: int):
    """Per-channel values (C,) -> (width * C,), repeated along an HWC row, for normalise_into."""
    return values.reshape(-1).repeat(width)


def single_threaded_ops() -> bool:
    """Make torch's CPU ops run in the calling thread alone; True where that took effect.

    For the preprocess threads, which are the parallelism: an op over more than
    32,768 elements (the normalisation) otherwise splits into an OpenMP team of
    its own for each calling thread, and 2 threads x 2 teams on 2 cores cost
    more CPU than they save.  OpenMP keeps its thread count per calling thread,
    so the model's own threads keep theirs; torch.set_num_threads would change
    them for the whole process, and threadpoolctl supports calls from the main
    thread only.  torch sets a thread's count the first time the thread asks
    for it, so it is asked first.
    """
    import ctypes

    import torch

    torch.get_num_threads()
    # Other packages bring OpenMP runtimes of their own (simsimd, through img2dataset, does):
    # each keeps its own count, and this thread is single-threaded in all of them.
    for runtime in _openmp_runtimes():
        try:
            ctypes.CDLL(runtime).omp_set_num_threads(1)
        except (OSError, AttributeError):
            continue
    return torch.get_num_threads() == 1


def _openmp_runtimes() -> List[str]:
    """The paths of the OpenMP runtimes loaded into this process (Linux; none elsewhere)."""
    found: List[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def resize_batch(x, target: Tuple[int, int], plan: FastResize):
    """uint8 NCHW pixels (on any device) -> NCHW resized to ``target`` and centre-cropped.

    The antialiased kernels are PIL's (a = -0.5 bicubic); on CPU the uint8
    kernel also rounds like PIL and the result stays uint8 (one float pass
    fewer for the caller); on other devices it is float.  Values stay in 0..255.
    """
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) != tuple(target):
        if x.device.type == "cpu":  # uint8 kernels (SIMD, PIL's rounding) exist on CPU only
            x = F.interpolate(x, size=target, mode=plan.interpolation, antialias=True)
        else:
            x = F.interpolate(x.float(), size=target, mode=plan.interpolation, antialias=True)
            x = x.clamp_(0, 255)
    top, left = plan.crop_box(*target) if plan.mode == "shortest" else (0, 0)
    h, w = plan.size
    return x[:, :, top:top + h, left:left + w]


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class _OnDemand:
    """Per-item results of ``fn(item)``, computed when first asked for (in the asking thread)."""

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any]):
        self._fn, self._items = fn, items

    def __getitem__(self, i: int):
        return self._fn(self._items[i])


class _RunResults:
    """Per-item results of ``fn(i, item)`` run on a pool in runs of consecutive items.

    One future per run rather than per image: a future and its lock cost more
    of the GIL than the Python part of decoding a small JPEG.
    """

    def __init__(self, pool, fn: Callable[[int, Any], Any], items: Sequence[Any], per_run: int):
        self._per_run = per_run
        self._futures = [pool.submit(self._run, fn, items, start, min(len(items), start + per_run))
                         for start in range(0, len(items), per_run)]

    @staticmethod
    def _run(fn, items, start, end):
        return [fn(i, items[i]) for i in range(start, end)]

    def __getitem__(self, i: int):
        return self._futures[i // self._per_run].result()[i % self._per_run]


@dataclasses.dataclass
class ScoredBatch:
    """Scores (float32, NaN where an image could not be decoded) and optional float16 embeddings."""
    scores: np.ndarray
    errors: List[Optional[str]]
    image_embeddings: Optional[np.ndarray] = None
    text_embeddings: Optional[np.ndarray] = None
    timings: Optional[Dict[str, float]] = None
    # tag_<name> / head_<name> -> float32 values (clip_tags.TagsAndHeads); None without tags or heads.
    columns: Optional[Dict[str, np.ndarray]] = None


class LoadedClip:
    """A model, its tokenizer and transform, and the threads that prepare images for it.

    One per worker process (Beam's Shared / multi_process_shared); its methods
    may be called from several threads at once.
    """

    def __init__(self, config: ClipConfig, resolved: Optional[ResolvedModel] = None):
        import open_clip
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.config = config
        self.resolved = resolved or resolve_model(config)
        self.device = pick_device(config.device)
        self.autocast = autocast_dtype(config.precision, self.device)
        r = self.resolved
        started = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # random weights are the same in every process
                model = open_clip.create_model(
                    r.name, pretrained=r.pretrained, device=self.device, precision="fp32",
                    cache_dir=config.cache_dir, force_preprocess_cfg=r.preprocess or None)
            tokenizer = open_clip.get_tokenizer(r.name, cache_dir=config.cache_dir)
        except ClipModelError:
            raise
        except Exception as exc:  # open_clip's own errors, reworded once
            raise ClipModelError(f"could not load CLIP model {r.name} ({r.pretrained or 'random'}): "
                                 f"{type(exc).__name__}: {exc}") from exc
        model.eval()
        self.model = model
        # The same token ids with less Python per caption, where the model uses CLIP's own BPE.
        self.tokenizer = fast_tokenizer(tokenizer) or tokenizer
        self.preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        split = split_transform(self.preprocess)
        self.pil_steps = split[0] if split else None
        size = model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        if split:
            self.mean = torch.tensor(split[1], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(split[2], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if config.preprocess not in PREPROCESS_MODES:
            raise ClipModelError(f"clip.preprocess must be one of {', '.join(PREPROCESS_MODES)}, "
                                 f"not {config.preprocess!r}")
        self.fast = (fast_resize_of(dict(model.visual.preprocess_cfg))
                     if config.preprocess == "fast" and split else None)
        if config.preprocess == "fast" and self.fast is None:
            _LOG.warning("clip.preprocess=fast cannot reproduce %s's image transform (%s); using the "
                         "exact path", r.name, model.visual.preprocess_cfg)
        if split:  # ToTensor + Normalize as one affine: x * scale + shift
            self.fast_scale = 1.0 / (255.0 * self.std)
            self.fast_shift = -self.mean / self.std
            self.host_scale = affine_row(self.fast_scale.cpu(), self.image_size[1])
            self.host_shift = affine_row(self.fast_shift.cpu(), self.image_size[1])
        # On a GPU the fast path decodes JPEGs there too (nvJPEG through torchvision), in
        # batches: a few hundredths of a core-ms per image instead of a quarter or more.
        self.device_decode = self.fast is not None and self.device.startswith("cuda")
        # On a CPU the preprocess threads write the model input itself (float32 NCHW), each
        # image normalised while it is in the thread's cache; for a GPU they prepare uint8
        # pixels, which cross to the device in a quarter of the bytes and are normalised there.
        self.host_input = (self.device == "cpu" and split is not None
                           and (self.fast is None or self.fast.size[0] * self.fast.size[1] >= PER_IMAGE_MIN_PIXELS))
        self.threads = config.preprocess_threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clip-preprocess",
                                       initializer=single_threaded_ops)
        self._local = threading.local()
        self.load_seconds = time.perf_counter() - started
        self.description = dict(r.description, device=self.device,
                                embed_dim=int(model.text_projection.shape[-1])
                                if getattr(model, "text_projection", None) is not None else None)
        from paircurate.transforms.clip_tags import tags_and_heads  # prompts encoded once, heads loaded
        self.tags_and_heads = tags_and_heads(
            config, model, self.tokenizer, self.device,
            self.description["embed_dim"] or getattr(model.visual, "output_dim", None), r.name)

    # -- image preparation (CPU threads) --

    def _prepare_into(self, out: np.ndarray, i: int, data: bytes) -> Optional[str]:
        """Decode one image and run the PIL steps of the model's transform into ``out[i]``."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                if self.pil_steps is None:
                    out[i] = self.preprocess(image).numpy()
                    return None
                prepared = self.pil_steps(image)
                array = np.asarray(prepared)
            if array.shape != out.shape[1:]:
                return f"unexpected shape {array.shape} after the model's transform"
            out[i] = array
            return None
        except Exception as exc:  # one bad image must not fail its batch
            return f"{type(exc).__name__}: {exc}"[:200]

    def _decode_fast(self, data: bytes):
        """("resize", (pixels, target)) | ("ready", final uint8 HWC pixels) | ("error", message)."""
        try:
            decoded = decode_for_resize(data, self.fast)
            if decoded is not None:
                return "resize", decoded
            out = np.empty((1, *self.image_size, 3), np.uint8)
            error = self._prepare_into(out, 0, data)
            return ("error", error) if error else ("ready", out[0])
        except Exception as exc:  # one bad image must not fail its batch
            return "error", f"{type(exc).__name__}: {exc}"[:200]

    def _prepare_exact_into(self, out, i: int, data: bytes) -> Optional[str]:
        """The exact path on a CPU: the model's PIL steps, then ToTensor + Normalize into ``out[i]``
        (out: the model input, as _buffer makes it)."""
        import torch

        ready = np.empty((1, *self.image_size, 3), np.uint8)
        error = self._prepare_into(ready, 0, data)
        if error is None:
            normalise_into(out[i], torch.from_numpy(ready[0]).permute(2, 0, 1), self.host_scale, self.host_shift)
        return error

    def _prepare_fast_into(self, out, i: int, data: bytes) -> Optional[str]:
        """The fast path on a CPU: decode, resize and normalise one image into ``out[i]``
        (out: the model input, as _buffer makes it), all on one preprocess thread while the image
        is in its cache."""
        try:
            decoded = decode_pixels(data, self.fast)
            if decoded is None:  # neither RGB nor greyscale: the model's own PIL steps
                return self._prepare_exact_into(out, i, data)
            normalise_into(out[i], resize_image(*decoded, self.fast), self.host_scale, self.host_shift)
            return None
        except Exception as exc:  # one bad image must not fail its batch
            return f"{type(exc).__name__}: {exc}"[:200]

    def _decode_on_device(self, images: Sequence[bytes], start: int, end: int) -> Dict[int, Any]:
        """{i: uint8 CHW RGB tensor on the device} for the JPEGs among images start..end.

        One image the batch decoder cannot read (corrupt, CMYK, ...) fails the
        whole call; then the chunk goes to the CPU decoder, which finds it.
        """
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i in range(start, end) if is_jpeg(images[i])]
        if not jpegs:
            return {}
        data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except Exception as exc:
            _LOG.info("batch JPEG decode on %s failed (%s); decoding %d images on the CPU",
                      self.device, exc, end - start)
            return {}
        return dict(zip(jpegs, decoded))

    def _fast_chunk(self, futures, start: int, end: int, errors: List[Optional[str]],
                    on_device: Optional[Dict[int, Any]] = None):
        """Model input for images start..end on the fast path: decoded on the device or on
        threads (``futures``), resized here in groups of one size."""
        import torch

        h, w = self.image_size
        groups: Dict[Tuple[Tuple[int, ...], Tuple[int, int]], List[Tuple[int, np.ndarray]]] = {}
        decoded: Dict[Tuple[Tuple[int, ...], Tuple[int, int]], List[Tuple[int, Any]]] = {}
        ready: List[Tuple[int, Any]] = []
        for i in range(start, end):
            if on_device and i in on_device:
                pixels = on_device[i]
                target = self.fast.resized(pixels.shape[2], pixels.shape[1])
                decoded.setdefault((tuple(pixels.shape), target), []).append((i - start, pixels))
                continue
            kind, value = futures[i]
            if kind == "error":
                errors[i] = value
            elif kind == "ready":
                ready.append((i - start, torch.from_numpy(value).to(self.device).permute(2, 0, 1)))
            else:
                pixels, target = value
                groups.setdefault((pixels.shape, target), []).append((i - start, pixels))
        parts = []  # (chunk positions, NCHW pixels 0..255)
        for (_shape, target), members in groups.items():
            host = torch.from_numpy(np.stack([p for _, p in members]))
            pixels = host.to(self.device).permute(0, 3, 1, 2)
            parts.append(([j for j, _ in members], resize_batch(pixels, target, self.fast)))
        for (_, target), members in decoded.items():
            parts.append(([j for j, _ in members], resize_batch(torch.stack([p for _, p in members]), target,
                                                                self.fast)))
        parts.extend(([j], p.unsqueeze(0)) for j, p in ready)
        if len(parts) == 1 and parts[0][0] == list(range(end - start)):
            # The usual chunk (one size, nothing failed): no copy into a fresh tensor, and
            # (x / 255 - mean) / std in two passes instead of three.
            return parts[0][1].float().mul_(self.fast_scale).add_(self.fast_shift)
        x = torch.zeros((end - start, 3, h, w), dtype=torch.float32, device=self.device)
        for positions, values in parts:
            x.index_copy_(0, torch.tensor(positions, device=self.device), values.float())
        return x.mul_(self.fast_scale).add_(self.fast_shift)

    def _buffer(self, n: int):
        """A (reused, pinned on CUDA) host buffer for n prepared images: uint8 NHWC for the
        exact path's PIL steps on a GPU, else float32 model input, NCHW with channels last
        in memory (normalise_into's layout; the model's first convolution takes either)."""
        import torch

        h, w = self.image_size
        uint8 = self.pil_steps is not None and not self.host_input
        dtype = torch.uint8 if uint8 else torch.float32
        cached = getattr(self._local, "buffer", None)
        if cached is None or cached.shape[0] < n or cached.shape[1:] != (h, w, 3) or cached.dtype != dtype:
            cached = torch.empty((n, h, w, 3), dtype=dtype, pin_memory=self.device.startswith("cuda"))
            self._local.buffer = cached
        return cached[:n] if uint8 else cached[:n].permute(0, 3, 1, 2)

    def _to_model_input(self, host):
        """Host uint8 NHWC -> normalised float NCHW on the device (ToTensor + Normalize)."""
        x = host.to(self.device, non_blocking=True)
        if self.pil_steps is None:
            return x
        x = x.permute(0, 3, 1, 2).contiguous().float().div_(255)
        return x.sub_(self.mean).div_(self.std)

    # -- scoring --

    def score(self, images: Sequence[bytes], captions: Sequence[str],
              embeddings: bool = False, chunk: Optional[int] = None, timed: bool = False) -> ScoredBatch:
        """Cosine similarity of each (image, caption) pair, in input order.

        Images are prepared on the thread pool while this thread tokenizes the
        captions and, chunk by chunk, feeds the device (CUDA runs asynchronously,
        so preparation of later chunks overlaps the model on earlier ones).
        """
        import torch
        import torch.nn.functional as F

        n = len(images)
        if n == 0:
            return ScoredBatch(np.zeros(0, np.float32), [])
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        per_run = max(1, min(16, n // (4 * self.threads)))  # a few runs per thread keep them balanced
        if self.device_decode:  # only what the device cannot decode comes back to the CPU
            futures = _OnDemand(self._decode_fast, images)
        elif self.host_input:  # on a CPU: the threads write the model input itself
            host = self._buffer(n)
            prepare = self._prepare_fast_into if self.fast is not None else self._prepare_exact_into
            futures = _RunResults(self.pool, lambda i, data: prepare(host, i, data), images, per_run)
        elif self.fast is not None:  # small inputs on a CPU: the threads decode, this one resizes
            futures = _RunResults(self.pool, lambda i, data: self._decode_fast(data), images, per_run)
        else:
            host = self._buffer(n)
            host_np = host.numpy()
            futures = _RunResults(self.pool, lambda i, data: self._prepare_into(host_np, i, data), images,
                                  per_run)
        tokens = self.tokenizer(list(captions))
        t_tok = time.perf_counter()
        timings["tokenize"] = t_tok - t0
        tokens = tokens.to(self.device, non_blocking=True)
        chunk = chunk or (256 if self.device.startswith("cuda") else n)
        errors: List[Optional[str]] = [None] * n
        image_out, text_out = [], []
        wait = model_time = 0.0
        cast = (torch.autocast(self.device.split(":")[0], dtype=self.autocast)
                if self.autocast is not None else nullcontext())
        with torch.inference_mode():
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                t = time.perf_counter()
                if self.device_decode or (self.fast is not None and not self.host_input):
                    on_device = self._decode_on_device(images, start, end) if self.device_decode else None
                    x = self._fast_chunk(futures, start, end, errors, on_device)
                    t2 = time.perf_counter()
                elif self.host_input:
                    for i in range(start, end):
                        errors[i] = futures[i]
                    t2 = time.perf_counter()
                    x = host[start:end]
                    failed = [i - start for i in range(start, end) if errors[i] is not None]
                    if failed:  # defined input for the rows whose scores become NaN
                        x[failed] = 0
                else:
                    for i in range(start, end):
                        errors[i] = futures[i]
                    t2 = time.perf_counter()
                    x = self._to_model_input(host[start:end])
                wait += t2 - t
                with cast:
                    image_features = self.model.encode_image(x)
                    text_features = self.model.encode_text(tokens[start:end])
                image_out.append(F.normalize(image_features.float(), dim=-1))
                text_out.append(F.normalize(text_features.float(), dim=-1))
                model_time += time.perf_counter() - t2
            image_emb = torch.cat(image_out)
            text_emb = torch.cat(text_out)
            scores = (image_emb * text_emb).sum(dim=-1)
            t3 = time.perf_counter()
            scores_np = scores.cpu().numpy().astype(np.float32)
            result = ScoredBatch(scores_np, errors)
            if self.tags_and_heads is not None:
                result.columns = self.tags_and_heads.columns(image_emb)
            if embeddings:
                result.image_embeddings = image_emb.half().cpu().numpy()
                result.text_embeddings = text_emb.half().cpu().numpy()
            t4 = time.perf_counter()
        for i, error in enumerate(errors):
            if error is not None:
                scores_np[i] = np.nan
        if timed:
            timings.update(wait_for_images=wait, model_launch=model_time, model_sync=t4 - t3,
                           total=t4 - t0)
            result.timings = timings
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def load_clip(config: ClipConfig) -> LoadedClip:
    """Resolve the weights (failing fast when they cannot be had) and load the model."""
    return LoadedClip(config)
