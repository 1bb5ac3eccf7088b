"""Train the demo's CLIP: a small open_clip model that matches demo pictures to their captions.

The demo (`paircurate demo`) serves pictures made by paircurate.demo.synthetic_image:
a coloured shape on a textured background, captioned "a {colour} {shape} on a
{colour} background".  This script trains the architecture in
configs/models/paircurate-demo.json on freshly generated pairs of that kind,
with open_clip's own model and contrastive loss (ClipLoss), on the CPU, and
writes the weights as float16 safetensors, which the package ships as
configs/models/paircurate-demo.safetensors.

Pictures are generated at the demo's sizes (200-640 px) and shown to the model
in two views: as the demo's run shows them (served as JPEG, letterboxed to
256 px by the pipeline's resize stage, then the model's transform to 64 px),
and the original through the model's transform alone (shorter side to 64 px,
centre crop), one of the two at random.  Each batch holds distinct captions,
so that no positive pair counts as a negative.

At the end the saved checkpoint is loaded through the pipeline's own loader
(paircurate.transforms.clip_model.LoadedClip, default fast path) and scores
held-out pictures (seeds never trained on), through the resize stage, with
their own caption (matched), with the caption of another picture
(mismatched) and with their caption in German, French or Spanish.  The
suggested clip.min_score is the midpoint of the gap between the highest
mismatched and the lowest matched score; if the two overlap, the cut that
misclassifies the fewest pairs.  paircurate.demo.DEMO_MIN_SCORE holds the value.

The shipped checkpoint was made with

    python scripts/train_demo_clip.py --out configs/models/paircurate-demo.safetensors

(the defaults: seed 0, 6,000 pictures, 800 steps of 256 at lr 3e-3) on the 2-core
development machine, shared with other work (load about 15): 10.0 min wall, 3.2 CPU
minutes (3.5 min of the wall time generating the pictures); loss 5.63 -> 0.59; held
out, matched pairs kept 98.9%, mismatched 1.3%, translated 0.3% at clip.min_score 0.727.
Run again with less other work (load about 5): 3.9 min wall, 3.0 CPU minutes, and a
byte-identical file (one torch thread, seeded generation and batches).
See the README, "The demo's CLIP".
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MODEL = "paircurate-demo"
#: First seed of the training pictures; the demo uses seeds below 100,000.
TRAIN_SEED_BASE = 1_000_000
#: First seed of the held-out pictures the threshold is chosen on.
HELD_OUT_SEED_BASE = 9_000_000


def pipeline_image(image) -> bytes:
    """The bytes the pipeline's CLIP stage gets for a demo picture: served as a JPEG, then
    brought to 256 px by the resize stage (the default config: letterboxed, "border")."""
    from paircurate.demo import encode
    from paircurate.transforms.resize import ImageConfig, make_resizer

    global _RESIZER
    if _RESIZER is None:
        _RESIZER = make_resizer(ImageConfig())
    resized, *_, error = _RESIZER(io.BytesIO(encode(image)))
    if error:
        raise ValueError(f"the resize stage refused a demo picture: {error}")
    return resized


_RESIZER = None


def _pictures(args: Tuple[Sequence[int], int]) -> Tuple[np.ndarray, List[str]]:
    """Generated pictures for ``seeds`` as the model sees them, uint8 (N, 2, size, size, 3), and
    their captions.  Two views of each: through the pipeline's resize stage (what the demo
    scores), and the original through the model's own transform alone (what `paircurate score`
    or another resize mode gives it); training draws one of the two at random."""
    seeds, size = args
    from PIL import Image

    from paircurate.demo import synthetic_image

    out = np.empty((len(seeds), 2, size, size, 3), np.uint8)
    captions = []
    for i, seed in enumerate(seeds):
        image, caption = synthetic_image(seed)
        for view, picture in enumerate((Image.open(io.BytesIO(pipeline_image(image))).convert("RGB"), image)):
            # open_clip's eval transform: shortest side to `size` (bicubic), centre crop.
            scale = size / min(picture.size)
            w, h = max(size, round(picture.width * scale)), max(size, round(picture.height * scale))
            picture = picture.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            out[i, view] = np.asarray(picture.crop((left, top, left + size, top + size)))
        captions.append(caption)
    return out, captions


def make_pool(seeds: Sequence[int], size: int, workers: int = 2) -> Tuple[np.ndarray, List[str]]:
    """The pictures and captions of ``seeds``, generated on ``workers`` processes."""
    chunks = [list(seeds[i:i + 500]) for i in range(0, len(seeds), 500)]
    if workers <= 1:
        parts = [_pictures((c, size)) for c in chunks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_pictures, [(c, size) for c in chunks]))
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def distinct_caption_batch(captions: Sequence[str], batch: int, rng: random.Random) -> List[int]:
    """Indices of up to ``batch`` pool entries whose captions all differ (no false negatives)."""
    order = list(range(len(captions)))
    rng.shuffle(order)
    seen, chosen = set(), []
    for i in order:
        if captions[i] not in seen:
            seen.add(captions[i])
            chosen.append(i)
            if len(chosen) == batch:
                break
    return chosen


def create_model(seed: int):
    """The demo architecture with fresh weights, its tokenizer and its normalisation."""
    import open_clip
    import torch

    from paircurate.transforms.clip_model import find_model_config

    open_clip.add_model_config(find_model_config(MODEL))
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None, device="cpu", precision="fp32")
    tokenizer = open_clip.get_tokenizer(MODEL)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return model, tokenizer, mean, std


def train(model, tokenizer, mean, std, pixels: np.ndarray, captions: Sequence[str], steps: int,
          batch: int, lr: float, seed: int, log_every: int = 50, log=print) -> List[float]:
    """Contrastive training (open_clip.ClipLoss) with AdamW and a cosine schedule; the losses."""
    import open_clip
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    # As open_clip's trainer: no weight decay on gains, biases, embeddings and the logit scale.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn = open_clip.ClipLoss()
    tokens = {c: t for c, t in zip(sorted(set(captions)), tokenizer(sorted(set(captions))))}
    all_pixels = torch.from_numpy(pixels)
    losses: List[float] = []
    model.train()
    for step in range(steps):
        chosen = distinct_caption_batch(captions, batch, rng)
        views = torch.randint(0, all_pixels.shape[1], (len(chosen),))
        x = all_pixels[torch.tensor(chosen), views].permute(0, 3, 1, 2).float().div_(255)
        flip = torch.rand(len(chosen)) < 0.5  # every shape in the demo is its own mirror image
        x[flip] = x[flip].flip(-1)
        x = (x - mean) / std
        text = torch.stack([tokens[captions[i]] for i in chosen])
        image_features, text_features, logit_scale = model(x, text)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # as open_clip: the temperature never exceeds 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"logit scale {model.logit_scale.detach().exp().item():.1f}")
    model.eval()
    return losses


def save_float16(model, path: str) -> int:
    """Write the model's state dict as float16 safetensors (complete, then renamed); its size."""
    import torch
    from safetensors.torch import save_file

    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = path + ".incomplete"
    save_file(state, temp, metadata={"format": "pt", "model_config": MODEL})
    os.replace(temp, path)
    return os.path.getsize(path)


def mismatched_captions(captions: Sequence[str], rng: random.Random) -> List[str]:
    """For each picture, the caption of another picture that says something else."""
    out = []
    for caption in captions:
        other = caption
        while other == caption:
            other = captions[rng.randrange(len(captions))]
        out.append(other)
    return out


def held_out_scores(checkpoint: str, n: int, seed: int) -> Dict[str, np.ndarray]:
    """Matched and mismatched scores of ``n`` held-out pictures as the demo's run scores them:
    through the resize stage and the pipeline's loader (default fast path)."""
    from paircurate.demo import synthetic_image, translated_caption
    from paircurate.transforms.clip_model import ClipConfig, LoadedClip

    clip = LoadedClip(ClipConfig(model_config=MODEL, pretrained=checkpoint, device="cpu",
                                 preprocess_threads=2))
    rng = random.Random(seed)
    pictures = [synthetic_image(HELD_OUT_SEED_BASE + seed * 100_000 + i) for i in range(n)]
    images = [pipeline_image(image) for image, _ in pictures]
    captions = [caption for _, caption in pictures]
    others = mismatched_captions(captions, rng)
    translated = [translated_caption(caption, rng.choice(("de", "fr", "es"))) for caption in captions]
    try:
        return {"matched": clip.score(images, captions).scores,
                "mismatched": clip.score(images, others).scores,
                "other languages": clip.score(images, translated).scores}
    finally:
        clip.close()


def choose_threshold(matched: np.ndarray, mismatched: np.ndarray) -> float:
    """The midpoint of the gap between the classes; with overlap, the cut between two neighbouring
    scores that misclassifies the fewest pairs (the middle one of equally good cuts)."""
    low, high = float(np.max(mismatched)), float(np.min(matched))
    if high > low:
        return (low + high) / 2
    values = np.unique(np.concatenate([matched, mismatched]))
    cuts = (values[:-1] + values[1:]) / 2
    errors = np.array([np.sum(matched < c) + np.sum(mismatched >= c) for c in cuts])
    best = cuts[errors == errors.min()]
    return float(best[(len(best) - 1) // 2])


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the picture generators)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="paircurate-demo.safetensors", help="Checkpoint to write.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", type=int, default=6000, help="Training pictures to generate.")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    # One torch thread: on the shared 2-core machine, two cost 4x the CPU time per step (they
    # spin while they wait for each other); the pictures are generated on two processes.
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workers", type=int, default=2, help="processes that generate the pictures")
    parser.add_argument("--held-out", type=int, default=1000, help="Held-out pictures to choose the threshold on.")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    model, tokenizer, mean, std = create_model(args.seed)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    first = TRAIN_SEED_BASE + args.seed * 100_000_000
    pixels, captions = make_pool(range(first, first + args.pictures), size, workers=args.workers)
    print(f"generated {len(captions)} pictures ({len(set(captions))} distinct captions) in "
          f"{time.perf_counter() - started:.0f}s", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL}: {params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch}", flush=True)
    losses = train(model, tokenizer, mean, std, pixels, captions, args.steps, args.batch, args.lr, args.seed,
                   log=lambda line: print(line, flush=True))
    size_bytes = save_float16(model, args.out)
    trained = time.perf_counter() - started
    print(f"wrote {args.out} ({size_bytes / 1e6:.1f} MB, float16); loss {losses[0]:.3f} -> "
          f"{np.mean(losses[-20:]):.3f}; training took {trained / 60:.1f} min ({cpu_seconds() / 60:.1f} CPU min)",
          flush=True)

    scores = held_out_scores(args.out, args.held_out, args.seed)
    for name, values in scores.items():
        print(f"held-out {name:>15}: min {values.min():.3f}  p05 {np.percentile(values, 5):.3f}  "
              f"median {np.median(values):.3f}  p95 {np.percentile(values, 95):.3f}  max {values.max():.3f}")
    threshold = choose_threshold(scores["matched"], scores["mismatched"])
    gap = float(scores["matched"].min() - scores["mismatched"].max())
    print(f"clip.min_score = {threshold:.3f} ({'midpoint of the gap' if gap > 0 else 'fewest errors; no gap'}: "
          f"lowest matched {scores['matched'].min():.3f}, highest mismatched {scores['mismatched'].max():.3f})")
    for name, values in scores.items():
        print(f"  kept at {threshold:.3f}: {name} {np.mean(values >= threshold):.1%}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min ({cpu_seconds() / 60:.1f} CPU min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
