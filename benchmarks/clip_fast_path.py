"""How far clip.preprocess=fast scores are from the exact path (open_clip's own transform).

Scores every image of a folder (photographs: see benchmarks/photo_set.py) with
both paths and prints the max and mean absolute score difference, and the same
for the model input itself (in 0..255 pixel units, before Normalize), which
does not depend on the weights.  Random weights unless --pretrained is given.

    python benchmarks/clip_fast_path.py IMAGES_DIR [IMAGES_DIR...] --models paircurate-tiny,ViT-B-32
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def model_inputs(loaded, images):
    """The 0..255 model input (N, 3, H, W) the loaded model's path builds for ``images``."""
    import torch

    if loaded.host_input:  # on a CPU the threads write the normalised model input
        x = loaded._buffer(len(images))
        prepare = loaded._prepare_fast_into if loaded.fast is not None else loaded._prepare_exact_into
        for i, data in enumerate(images):
            prepare(x, i, data)
        return (x * loaded.std + loaded.mean).mul_(255).cpu().numpy()
    if loaded.fast is not None:
        futures = [loaded._decode_fast(data) for data in images]
        errors = [None] * len(images)
        on_device = loaded._decode_on_device(images, 0, len(images)) if loaded.device_decode else None
        x = loaded._fast_chunk(futures, 0, len(images), errors, on_device)
        return (x * loaded.std + loaded.mean).mul_(255).cpu().numpy()
    host = loaded._buffer(len(images)).numpy()
    for i, data in enumerate(images):
        loaded._prepare_into(host, i, data)
    return torch.from_numpy(host).permute(0, 3, 1, 2).float().numpy()


def compare(model: str, images, captions, pretrained: str, batch: int):
    from paircurate.transforms.clip_model import ClipConfig, ClipModelError, find_model_config, load_clip

    try:
        find_model_config(model)
        base = ClipConfig(model_config=model, pretrained=pretrained, device="cpu", batch_size=batch,
                          preprocess="exact")
    except ClipModelError:
        base = ClipConfig(model=model, pretrained=pretrained, device="cpu", batch_size=batch,
                          preprocess="exact")
    exact = load_clip(base)
    fast = load_clip(dataclasses.replace(base, preprocess="fast"))
    assert fast.fast is not None, "the fast path does not apply to this model"
    scores = {}
    pixels = []
    for name, loaded in (("exact", exact), ("fast", fast)):
        out = []
        for start in range(0, len(images), batch):
            out.append(loaded.score(images[start:start + batch], captions[start:start + batch]).scores)
        scores[name] = np.concatenate(out)
        pixels.append(np.concatenate([model_inputs(loaded, images[s:s + 64])
                                      for s in range(0, len(images), 64)]))
    diff = np.abs(scores["exact"] - scores["fast"])
    pix = np.abs(pixels[0] - pixels[1])
    return {"model": model, "image": exact.image_size, "pairs": len(images),
            "score_max": float(diff.max()), "score_mean": float(diff.mean()),
            "score_spread": float(scores["exact"].std()),
            "pixel_max": float(pix.max()), "pixel_mean": float(pix.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--models", default="paircurate-tiny,ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from clip_throughput import WORDS  # this folder is on sys.path when run as a script

    for folder in args.folders:
        paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
        if not paths:
            parser.error(f"no .jpg files in {folder}")
        images = [open(p, "rb").read() for p in paths]
        captions = [" ".join(random.Random(i).choices(WORDS, k=8 + i % 10)) for i in range(len(images))]
        for model in [m for m in args.models.split(",") if m]:
            r = compare(model, images, captions, args.pretrained, args.batch_size)
            print(f"{folder}: {model} {r['image'][0]}px, {r['pairs']} pairs: |score diff| max "
                  f"{r['score_max']:.2e} mean {r['score_mean']:.2e} (score std {r['score_spread']:.3f}); "
                  f"|input diff| max {r['pixel_max']:.1f} mean {r['pixel_mean']:.2f} of 255", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
