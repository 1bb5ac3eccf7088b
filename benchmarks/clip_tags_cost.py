"""What zero-shot tags and trained heads add to CLIP scoring, per pair.

Scores the same pairs (generated 256px JPEGs, as benchmarks/clip_throughput.py
makes them) with LoadedClip.score, random weights, in alternating rounds:

* none: clip.tags {} and no heads;
* tags+heads: the default tags (unsafe, watermark: 14 prompts) and one head
  shaped like LAION's improved aesthetic predictor (embed_dim-1024-128-64-16-1
  Linear layers), saved to a temporary safetensors file.

It prints, per setting, the median over rounds of wall and process CPU
milliseconds per pair, the ratio tags+heads / none, and the time of the tag and
head arithmetic alone (TagsAndHeads.columns on the batch's image embeddings).

    python benchmarks/clip_tags_cost.py --model paircurate-tiny --n 2048 --batch-size 256 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def aesthetic_like_head(dim: int, path: str) -> str:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sizes = [dim, 1024, 128, 64, 16, 1]
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    save_file({f"layers.{i}.{k}": v.contiguous() for i, layer in enumerate(layers)
               for k, v in layer.state_dict().items()}, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="paircurate-tiny", help="a shipped model config or an open_clip name")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preprocess", default="fast")
    args = parser.parse_args(argv)

    from clip_throughput import make_pair

    from paircurate.transforms.clip_model import ClipConfig, LoadedClip

    pairs = [make_pair(i) for i in range(args.n)]
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    shipped = args.model == "paircurate-tiny" or args.model.endswith(".json")
    base = dict(model_config=args.model if shipped else None, model=args.model, pretrained="none",
                device=args.device, batch_size=args.batch_size, preprocess=args.preprocess)
    none = LoadedClip(ClipConfig(**base, tags={}, heads={}))
    dim = none.description["embed_dim"]
    with tempfile.TemporaryDirectory() as folder:
        head = aesthetic_like_head(dim, os.path.join(folder, "aesthetic.safetensors"))
        full = LoadedClip(ClipConfig(**base, heads={"aesthetic": {"path": head, "hidden": "none"}}))
    settings = {"none": none, "tags+heads": full}

    def run(loaded):
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, args.n, args.batch_size):
            loaded.score(images[start:start + args.batch_size], captions[start:start + args.batch_size])
        return (time.perf_counter() - wall) * 1000 / args.n, (time.process_time() - cpu) * 1000 / args.n

    run(none), run(full)  # warm up
    results = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, loaded in settings.items():
            results[name].append(run(loaded))
    import torch

    emb = torch.nn.functional.normalize(torch.randn(args.batch_size, dim, device=full.device), dim=-1)
    started = time.perf_counter()
    for _ in range(20):
        full.tags_and_heads.columns(emb)
    alone = (time.perf_counter() - started) * 1000 / (20 * args.batch_size)

    print(f"model {args.model} (embed_dim {dim}), device {full.device}, {args.n} pairs, batch "
          f"{args.batch_size}, {args.rounds} rounds, {os.cpu_count()} CPUs")
    medians = {}
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        medians[name] = (wall, cpu)
        print(f"  {name:11s} wall {wall:.3f} ms/pair  CPU {cpu:.3f} core-ms/pair  "
              f"(rounds: {', '.join(f'{v[0]:.3f}' for v in values)})")
    print(f"  ratio tags+heads / none: wall {medians['tags+heads'][0] / medians['none'][0]:.3f}, "
          f"CPU {medians['tags+heads'][1] / medians['none'][1]:.3f}")
    print(f"  tag and head arithmetic alone: {alone * 1000:.2f} us/pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
