"""CLIP scoring throughput: the pipeline's scoring stage next to the model alone.

Makes N pairs (generated 256px JPEGs, or --photos cycling a folder of stored
images such as benchmarks/photo_set.py makes) with captions in WebDataset
shards, then for each model (random weights, so nothing is downloaded) and each
clip.preprocess path measures:

* model only: encode_image + encode_text on ready tensors on the device
  (batch --model-batch, fp16 autocast on CUDA), the ceiling, and the host CPU
  the forward itself costs per pair;
* where the time goes: JPEG decode, the path's host-side preparation, caption
  tokenization, host->device transfer, nvJPEG batch decode (on CUDA);
* the scoring stage without Beam (LoadedClip.score over batches of --batch-size);
* the scoring stage in Beam: shards read and scored by ScoreAndFilter on the
  local runner (one process with threads, or --beam-mode multi_processing),
  run on a fifth of the shards and on all of them: the difference gives the
  marginal rate and CPU per pair, free of pipeline start and model loads; and
  (one process) the steady state of the full run alone, from the start of its
  first batch to the start of its last, which varies less.

Every stage figure comes with the CPU core-ms per pair spent outside the model
forward (process CPU time, worker processes included, minus the forward's own).

GPU:  python benchmarks/clip_throughput.py --photos DIR     (50,000 pairs, ViT-B-32 and ViT-L-14)
CPU:  python benchmarks/clip_throughput.py --n 5120 --per-shard 512 --models ViT-B-32,paircurate-tiny \
          --batch-size 256 --model-batch 256 --photos DIR --stub-forward
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never look anything up
# OpenMP threads that spin between parallel regions would bill their waiting to
# the forward or to preprocessing at random; passive waiting keeps the CPU
# figures about work done.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

WORDS = ("a photo of the red blue green small large old new dog cat car house tree street city "
         "beach mountain river people man woman child playing standing sitting near with under "
         "over black white wooden metal glass bright dark sunny night morning vintage modern").split()


def make_pair(i: int, size: int = 256) -> Tuple[bytes, str]:
    """A distinct 256px JPEG (smooth random colour field plus noise) and a caption."""
    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = np.asarray(low.resize((size, size), Image.BILINEAR), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue(), make_pair_caption(i)


def make_pair_caption(i: int) -> str:
    return " ".join(random.Random(i).choices(WORDS, k=8 + i % 10))


def photo_pairs(folder: str) -> List[bytes]:
    """The .jpg files of a folder (e.g. made by benchmarks/photo_set.py), cycled by write_shards."""
    import glob

    photos = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*.jpg")))]
    if not photos:
        raise SystemExit(f"no .jpg files in {folder}")
    return photos


def write_shards(folder: str, n: int, per_shard: int = 1000, threads: int = 0,
                 photos: Sequence[bytes] = ()) -> List[str]:
    """WebDataset shards of n pairs, generated or cycling ``photos`` (reused when already there)."""
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f"done-{n}")
    paths = [os.path.join(folder, f"{s:05d}.tar") for s in range((n + per_shard - 1) // per_shard)]
    if os.path.exists(marker):
        return paths
    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        for s, path in enumerate(paths):
            ids = range(s * per_shard, min(n, (s + 1) * per_shard))
            with tarfile.open(path, "w") as tar:
                made = (pool.map(make_pair, ids) if not photos else
                        ((photos[i % len(photos)], make_pair_caption(i)) for i in ids))
                for i, (jpeg, caption) in zip(ids, made):
                    key = f"{i:09d}"
                    with Image.open(io.BytesIO(jpeg)) as image:  # stored shards' json has the size
                        width, height = image.size
                    meta = json.dumps({"key": key, "uid": f"{i:032x}", "width": width,
                                       "height": height}).encode()
                    for name, data in ((key + ".jpg", jpeg), (key + ".txt", caption.encode()),
                                       (key + ".json", meta)):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    open(marker, "w").close()
    return paths


def read_pairs(paths: Sequence[str]) -> Tuple[List[bytes], List[str]]:
    from paircurate.transforms.files import iter_samples

    images, captions = [], []
    for path in paths:
        with open(path, "rb") as handle:
            for _, members in iter_samples(handle):
                images.append(members["jpg"])
                captions.append(members["txt"].decode())
    return images, captions


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def cpu_seconds() -> float:
    """CPU time of this process, all threads, and of its exited children (user + system)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def model_only(loaded, batch: int, seconds: float = 3.0) -> Tuple[float, float]:
    """(pairs/s, CPU core-seconds per pair) of encode_image + encode_text on device tensors.

    The rate is the ceiling for this model; the CPU figure is what the forward
    itself costs the host (all of it on CPU; launches and sync waits on CUDA),
    which the stage figures subtract to get the CPU spent outside the model.
    """
    from contextlib import nullcontext

    import torch

    h, w = loaded.image_size
    x = torch.randn(batch, 3, h, w, device=loaded.device)
    tokens = loaded.tokenizer(["a photo of a dog playing near the river"] * batch).to(loaded.device)
    cast = (torch.autocast(loaded.device.split(":")[0], dtype=loaded.autocast)
            if loaded.autocast is not None else nullcontext())

    def step():
        with torch.inference_mode(), cast:
            a = loaded.model.encode_image(x)
            b = loaded.model.encode_text(tokens)
        return a, b

    step()
    sync(loaded.device)
    done, started, cpu = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - started < seconds or done == 0:
        step()
        done += batch
    sync(loaded.device)
    return rate(done, time.perf_counter() - started), (cpu_seconds() - cpu) / done


def breakdown(loaded, images: List[bytes], captions: List[str], batch: int) -> Dict[str, float]:
    """Per-part rates (and CPU core-ms per item) on a sample: decode, the path's host-side
    preparation, tokenize, transfer; on CUDA also nvJPEG batch decode, for comparison."""
    import torch

    sample = images[: max(batch, min(len(images), 4 * batch))]
    pool = loaded.pool
    figures: Dict[str, float] = {}

    def measure(name: str, count: int, work) -> None:
        started, cpu = time.perf_counter(), cpu_seconds()
        work()
        figures[name] = rate(count, time.perf_counter() - started)
        figures[name.replace("_per_s", "_cpu_ms")] = (cpu_seconds() - cpu) / count * 1e3

    def decode(data):
        with Image.open(io.BytesIO(data)) as im:
            im.load()

    measure("decode_images_per_s", len(sample), lambda: list(pool.map(decode, sample)))
    h, w = loaded.image_size
    out = np.empty((len(sample), h, w, 3), np.uint8)
    if loaded.fast is not None and loaded.host_input:  # the fast path on a CPU, step by step
        from paircurate.transforms.clip_model import decode_pixels, resize_image

        resize_image(*decode_pixels(sample[0], loaded.fast), loaded.fast)  # first calls load kernels
        measure("fast_decode_images_per_s", len(sample),
                lambda: list(pool.map(lambda d: decode_pixels(d, loaded.fast), sample)))
        measure("fast_resize_images_per_s", len(sample),
                lambda: list(pool.map(lambda d: resize_image(*decode_pixels(d, loaded.fast), loaded.fast),
                                      sample)))
        ready = loaded._buffer(len(sample))
        ready.fill_(0)  # its pages touched before the clock starts, as a stage's reused buffer is
        measure("prepare_images_per_s", len(sample),
                lambda: list(pool.map(lambda i: loaded._prepare_fast_into(ready, i, sample[i]),
                                      range(len(sample)))))
    elif loaded.fast is not None:
        measure("prepare_images_per_s", len(sample), lambda: list(pool.map(loaded._decode_fast, sample)))
    elif loaded.host_input:  # the exact path on a CPU: PIL steps, then normalised on the threads
        ready = loaded._buffer(len(sample))
        ready.fill_(0)
        measure("prepare_images_per_s", len(sample),
                lambda: list(pool.map(lambda i: loaded._prepare_exact_into(ready, i, sample[i]),
                                      range(len(sample)))))
    elif loaded.pil_steps is not None:
        measure("prepare_images_per_s", len(sample),
                lambda: list(pool.map(lambda i: loaded._prepare_into(out, i, sample[i]), range(len(sample)))))
    texts = captions[: len(sample)]
    measure("tokenize_captions_per_s", len(texts), lambda: loaded.tokenizer(texts))

    if loaded.device.startswith("cuda"):
        host = torch.from_numpy(out[:batch]).pin_memory()
        host.to(loaded.device, non_blocking=True)
        sync(loaded.device)
        reps, started = 10, time.perf_counter()
        for _ in range(reps):
            host.to(loaded.device, non_blocking=True)
        sync(loaded.device)
        seconds = time.perf_counter() - started
        figures["transfer_pairs_per_s"] = rate(reps * len(host), seconds)
        figures["transfer_gb_per_s"] = reps * host.numel() * host.element_size() / seconds / 1e9
        try:
            from torchvision.io import decode_jpeg

            encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in sample[:batch]]
            decode_jpeg(encoded, device=loaded.device)
            sync(loaded.device)

            def nvjpeg():
                decode_jpeg(encoded, device=loaded.device)
                sync(loaded.device)
            measure("nvjpeg_decode_images_per_s", len(encoded), nvjpeg)
        except Exception as exc:  # informative only
            print(f"    (nvJPEG decode not measured: {type(exc).__name__}: {exc})")
    return figures


def stage_without_beam(loaded, images, captions, batch: int) -> Dict[str, float]:
    loaded.score(images[:batch], captions[:batch])  # warm-up (allocator, kernels)
    parts: Dict[str, float] = {}
    started, cpu = time.perf_counter(), cpu_seconds()
    for start in range(0, len(images), batch):
        result = loaded.score(images[start:start + batch], captions[start:start + batch], timed=True)
        for name, value in result.timings.items():
            parts[name] = parts.get(name, 0.0) + value
    total = time.perf_counter() - started
    return {"pairs_per_s": rate(len(images), total), "seconds": total,
            "cpu_s_per_pair": (cpu_seconds() - cpu) / len(images),
            **{f"time_{k}_s": round(v, 3) for k, v in parts.items()}}


def stage_shards(paths: Sequence[str], folder: str) -> List[str]:
    """Stage the pairs of ``paths`` as the pipeline does before dedup: one segment per shard.

    Returns the segments' index files, which stage_in_beam turns into the slim
    records that reach the CLIP stage (reused when already there).
    """
    from paircurate.score import input_root, read_shard
    from paircurate.transforms.staging import SegmentWriter, list_indexes

    marker = os.path.join(folder, f"done-{len(paths)}")
    if not os.path.exists(marker):
        os.makedirs(folder, exist_ok=True)
        root = input_root(paths)
        for path in paths:
            writer = SegmentWriter(folder, max_records=1 << 30, max_bytes=1 << 40)
            for record in read_shard(path, root, 1 << 26):
                writer.stage(record)
            writer.close()
        open(marker, "w").close()
    return list_indexes(folder)


def slim_records(index_path: str):
    """The slim records of one staged segment, as dedup hands them to the CLIP stage."""
    from paircurate.transforms.staging import DECIDED_FIELDS, read_index

    for uid, entry in read_index(index_path):
        record = dict.fromkeys(DECIDED_FIELDS)
        record.update(uid=uid, status="ok", image_ref=entry["ref"])
        yield record


def stage_in_beam(clip_config, paths: Sequence[str], workers: int = 1,
                  mode: str = "multi_threading", staging: str = "") -> Dict[str, float]:
    """Score pairs with the CLIP stage (no filter) on the local runner.

    Without ``staging``: read the shards and score the records (image bytes
    carried), as ``paircurate score`` does.  With it, ``paths`` are staging
    index files: slim records go through the pipeline's own CLIP wiring
    (graph.add_clip: details and bytes read back from staging), as in ``run``.

    workers > 1 runs bundles on that many threads of this process (they share
    one model), or with mode multi_processing on that many worker processes
    (fresh interpreters, so starting them after CUDA is initialised is safe;
    their CPU time is counted once they have exited).
    """
    import apache_beam as beam

    from paircurate.config import Config
    from paircurate.graph import add_clip
    from paircurate.score import _ReadShard, input_root
    from paircurate.transforms.beam_util import make_pipeline
    from paircurate.transforms.clip import ScoreAndFilter
    from paircurate.transforms.clip_model import LoadedClip

    started, cpu = time.perf_counter(), cpu_seconds()
    options = ([f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
               if workers > 1 else [])
    calls: List[Tuple[float, float, int]] = []  # (wall, process CPU, pairs) at the start of each batch
    score = LoadedClip.score
    if workers == 1:  # one bundle thread in this process: its batches follow one another
        def timed_score(self, images, *a, **kw):
            calls.append((time.perf_counter(), cpu_seconds(), len(images)))
            return score(self, images, *a, **kw)
        LoadedClip.score = timed_score
    pipeline = make_pipeline("DirectRunner", options)
    if staging:
        records = (pipeline | beam.Create(list(paths)) | beam.FlatMap(slim_records))
        scored = add_clip(records, Config(clip=clip_config), staging, staging)
    else:
        scored = (pipeline | beam.Create(list(paths))
                  | beam.ParDo(_ReadShard(input_root(paths), 1 << 26))
                  | ScoreAndFilter(clip_config, None))
    (scored
     | beam.Map(lambda r: 1 if r.get("clip_score") is not None else 0)
     | beam.CombineGlobally(sum)
     | beam.Map(lambda n: print(f"      beam: {n} pairs scored", flush=True)))
    try:
        pipeline.run().wait_until_finish()
    finally:
        LoadedClip.score = score
    figures = {"seconds": time.perf_counter() - started, "cpu_s": cpu_seconds() - cpu}
    figures.update(steady_state(calls))
    return figures


def steady_state(calls: Sequence[Tuple[float, float, int]]) -> Dict[str, float]:
    """Pairs/s and process CPU per pair from the start of the first batch to the start of the
    last: every batch in between with all the Beam work around it (reads, batching, attaching
    scores), and neither pipeline start, model load nor the run's tail."""
    if len(calls) < 3:
        return {}
    pairs = sum(n for _, _, n in calls[:-1])
    wall, cpu = calls[-1][0] - calls[0][0], calls[-1][1] - calls[0][1]
    return {"steady_pairs": pairs, "steady_pairs_per_s": rate(pairs, wall), "steady_cpu_s_per_pair": cpu / pairs}


def stub_forward() -> None:
    """encode_image / encode_text of every open_clip model in this process return zeros."""
    import open_clip

    def encode(self, x, normalize: bool = False):
        width = self.text_projection.shape[-1] if getattr(self, "text_projection", None) is not None else 512
        return x.new_zeros((x.shape[0], width), dtype=torch_float())

    for cls in (open_clip.CLIP, open_clip.CustomTextCLIP):
        cls.encode_image = encode
        cls.encode_text = encode


def stub_images() -> None:
    """The fast path's image decode and resize cost nothing (the model gets uninitialised input):
    with stub_forward, what a stage run still costs is its per-pair Python work (Beam, reads,
    tokenization, batching), the part that a GPU host's CPUs must still do."""
    import torch

    from paircurate.transforms.clip_model import LoadedClip

    def decode(self, data):
        return "ready", None

    def chunk(self, futures, start, end, errors, on_device=None):
        for i in range(start, end):
            futures[i]
        return torch.empty((end - start, 3, *self.image_size))

    def prepare(self, out, i, data):
        return None

    LoadedClip._decode_fast = decode
    LoadedClip._fast_chunk = chunk
    LoadedClip._prepare_fast_into = prepare


def torch_float():
    import torch
    return torch.float32


def clip_config_for(model: str, args, preprocess: str = "exact") -> Any:
    from paircurate.transforms.clip_model import ClipConfig, ClipModelError, find_model_config

    try:
        find_model_config(model)
        custom = True
    except ClipModelError:
        custom = os.path.isfile(model)
    values = dict(pretrained="none", device=args.device, batch_size=args.batch_size,
                  preprocess_threads=args.threads, precision=args.precision, preprocess=preprocess,
                  share_model_across_processes=getattr(args, "share_model", False))
    return ClipConfig(model_config=model, **values) if custom else ClipConfig(model=model, **values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000, help="pairs to score")
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14",
                        help="comma-separated open_clip names or configs/models names")
    parser.add_argument("--preprocess", default="exact,fast", help="clip.preprocess modes to measure")
    parser.add_argument("--photos", help="cycle the .jpg files of this folder instead of generated images")
    parser.add_argument("--batch-size", type=int, default=1024, help="pairs per scoring call")
    parser.add_argument("--model-batch", type=int, default=1024, help="batch of the model-only measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="preprocess threads (0: one per core)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "paircurate-clip-bench"))
    parser.add_argument("--skip-beam", action="store_true", help="skip the Beam end-to-end run")
    parser.add_argument("--skip-breakdown", action="store_true", help="skip the per-part rates")
    parser.add_argument("--skip-direct", action="store_true", help="skip the stage without Beam")
    parser.add_argument("--beam-preprocess", default="exact,fast", help="the modes to run the Beam stage with")
    parser.add_argument("--per-shard", type=int, default=1000,
                        help="pairs per shard (shards are what Beam workers share out)")
    parser.add_argument("--beam-mode", default="multi_threading", choices=("multi_threading", "multi_processing"),
                        help="how --beam-workers run")
    parser.add_argument("--beam-source", default="shards", choices=("shards", "staging"),
                        help="the Beam stage reads WebDataset shards (carried bytes, like `score`) or slim "
                             "records whose details and bytes are staged (like `run`, after dedup)")
    parser.add_argument("--share-model", action="store_true", help="clip.share_model_across_processes=true")
    parser.add_argument("--beam-workers", type=int, default=1,
                        help="local runner bundle threads (they share the model; threads, never processes)")
    parser.add_argument("--check", type=int, default=64,
                        help="on CUDA: compare this many pairs' scores with CPU fp32 (0: skip)")
    parser.add_argument("--stub-forward", action="store_true",
                        help="replace encode_image/encode_text by zeros (in this process, Beam's in_memory "
                             "runner included): the CPU figures of a large model on a CPU, without its forward")
    parser.add_argument("--stub-images", action="store_true",
                        help="with --stub-forward and clip.preprocess=fast: no image decode or resize either, "
                             "so the CPU figures are the stage's per-pair Python work alone")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from paircurate.transforms.clip_model import load_clip

    if args.stub_forward:
        stub_forward()
    if args.stub_images:
        stub_images()

    started = time.perf_counter()
    photos = photo_pairs(args.photos) if args.photos else ()
    kind = f"photos-{len(photos)}" if photos else "generated"
    paths = write_shards(os.path.join(args.workdir, f"shards-{kind}-{args.n}-{args.per_shard}"), args.n,
                         args.per_shard, photos=photos)
    print(f"data: {args.n} pairs of {'photograph' if photos else 'generated'} JPEG + caption in "
          f"{len(paths)} shards ({time.perf_counter() - started:.1f}s to make or find)", flush=True)
    import paircurate.score  # noqa: F401  (Beam's import time is not read time)
    started = time.perf_counter()
    images, captions = read_pairs(paths)
    print(f"read shards: {rate(len(images), time.perf_counter() - started):,.0f} pairs/s "
          f"({sum(map(len, images)) / len(images) / 1024:.1f} KiB/image)", flush=True)
    print(f"host: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)

    # Imports that the first model load pays would otherwise count as that model's load.
    load_clip(clip_config_for("paircurate-tiny", argparse.Namespace(**dict(vars(args), device="cpu",
                                                                         precision="fp32")))).close()
    report: Dict[str, Any] = {"n": args.n, "batch_size": args.batch_size, "data": kind, "models": {}}
    modes = [m for m in args.preprocess.split(",") if m]
    for model in [m for m in args.models.split(",") if m]:
        figures: Dict[str, Any] = {}
        report["models"][model] = figures
        model_cpu = None
        for mode in modes:
            config = clip_config_for(model, args, mode)
            loaded = load_clip(config)
            dtype = {None: "fp32"}.get(loaded.autocast, str(loaded.autocast).replace("torch.", ""))
            if model_cpu is None:
                print(f"\n{model} (random weights) on {loaded.device}, {dtype}, image {loaded.image_size}, "
                      f"batch {args.batch_size}, {loaded.threads} preprocess threads, "
                      f"load {loaded.load_seconds:.1f}s", flush=True)
                figures.update(device=loaded.device, precision=dtype)
                figures["model_only_pairs_per_s"], model_cpu = model_only(loaded, args.model_batch)
                figures["model_only_cpu_ms_per_pair"] = model_cpu * 1e3
                print(f"  model only (batch {args.model_batch:<5})           : "
                      f"{figures['model_only_pairs_per_s']:>10,.0f} pairs/s "
                      f"({model_cpu * 1e3:.3f} core-ms/pair of host CPU)", flush=True)
            print(f"  clip.preprocess={mode}", flush=True)
            part: Dict[str, Any] = {}
            figures[mode] = part
            if not args.skip_breakdown:
                part.update(breakdown(loaded, images, captions, args.batch_size))
                for key, label, unit in (("decode_images_per_s", "decode only (PIL, threads)", "images/s"),
                                         ("fast_decode_images_per_s", "fast path: decode", "images/s"),
                                         ("fast_resize_images_per_s", "fast path: decode + resize", "images/s"),
                                         ("prepare_images_per_s", "decode + host part of transform", "images/s"),
                                         ("tokenize_captions_per_s", "tokenize (one thread)", "captions/s"),
                                         ("transfer_pairs_per_s", "host->device uint8 (pinned)", "pairs/s"),
                                         ("nvjpeg_decode_images_per_s", "nvJPEG batch decode (torchvision)",
                                          "images/s")):
                    if key in part:
                        cpu_ms = part.get(key.replace("_per_s", "_cpu_ms"))
                        print(f"    {label:<34}: {part[key]:>10,.0f} {unit}"
                              + (f" ({cpu_ms:.3f} core-ms each)" if cpu_ms is not None else ""), flush=True)
            if not args.skip_direct:
                direct = stage_without_beam(loaded, images, captions, args.batch_size)
                part["stage_no_beam"] = direct
                direct["cpu_ms_per_pair_outside_model"] = (direct["cpu_s_per_pair"] - model_cpu) * 1e3
                parts = ", ".join(f"{k[5:-2]} {v}s" for k, v in direct.items() if k.startswith("time_"))
                print(f"    scoring stage, no Beam            : {direct['pairs_per_s']:>10,.0f} pairs/s, "
                      f"{direct['cpu_ms_per_pair_outside_model']:.3f} core-ms/pair outside the model "
                      f"({direct['seconds']:.1f}s; {parts})", flush=True)
            if args.check and loaded.device.startswith("cuda"):
                import dataclasses
                cpu_model = load_clip(dataclasses.replace(config, device="cpu", precision="fp32",
                                                          preprocess="exact"))
                k = min(args.check, len(images))
                diff = np.abs(cpu_model.score(images[:k], captions[:k]).scores
                              - loaded.score(images[:k], captions[:k]).scores)
                part["max_abs_diff_vs_cpu_fp32_exact"] = float(diff.max())
                print(f"    scores vs CPU fp32 exact ({k} pairs): max |diff| {diff.max():.2e}", flush=True)
                cpu_model.close()
            loaded.close()
            del loaded
            if not args.skip_beam and mode in args.beam_preprocess.split(","):
                # Two runs, on a fifth of the shards and on all of them: the difference is the
                # marginal cost per pair, free of pipeline start, worker start and model loads.
                sources, staging = paths, ""
                if args.beam_source == "staging":
                    staging = os.path.join(args.workdir, f"staged-{kind}-{args.n}-{args.per_shard}")
                    sources = stage_shards(paths, staging)
                small_paths = sources[:max(1, len(sources) // 5)]
                small_n = min(args.n, len(small_paths) * args.per_shard)
                small = stage_in_beam(config, small_paths, args.beam_workers, args.beam_mode, staging)
                full = stage_in_beam(config, sources, args.beam_workers, args.beam_mode, staging)
                beam_figures = {"seconds": full["seconds"], "pairs_per_s": rate(args.n, full["seconds"])}
                if small_n < args.n:
                    extra = args.n - small_n
                    beam_figures["marginal_pairs_per_s"] = rate(extra, full["seconds"] - small["seconds"])
                    beam_figures["cpu_ms_per_pair_outside_model"] = (
                        (full["cpu_s"] - small["cpu_s"]) / extra - model_cpu) * 1e3
                if "steady_cpu_s_per_pair" in full:
                    beam_figures["steady_pairs_per_s"] = full["steady_pairs_per_s"]
                    beam_figures["steady_cpu_ms_per_pair_outside_model"] = (
                        full["steady_cpu_s_per_pair"] - model_cpu) * 1e3
                part["stage_beam"] = beam_figures
                print(f"    scoring stage in Beam (read+score): {beam_figures['pairs_per_s']:>10,.0f} pairs/s "
                      f"({full['seconds']:.1f}s incl. pipeline start and model load)", flush=True)
                if "marginal_pairs_per_s" in beam_figures:
                    print(f"      marginal ({small_n:,} -> {args.n:,} pairs): "
                          f"{beam_figures['marginal_pairs_per_s']:>10,.0f} pairs/s, "
                          f"{beam_figures['cpu_ms_per_pair_outside_model']:.3f} core-ms/pair outside the model",
                          flush=True)
                if "steady_pairs_per_s" in beam_figures:
                    print(f"      steady state ({full['steady_pairs']:,} pairs)  : "
                          f"{beam_figures['steady_pairs_per_s']:>10,.0f} pairs/s, "
                          f"{beam_figures['steady_cpu_ms_per_pair_outside_model']:.3f} core-ms/pair outside the model",
                          flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\nJSON " + json.dumps(report, default=float))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
