"""Caption tokenization: open_clip's SimpleTokenizer next to paircurate's FastClipTokenizer.

Two caption sets: the generated captions of clip_throughput.py (a small
vocabulary, as in its shards) and the non-empty lines of this repository's
README and Python sources (prose, code and tables: a long tail of words).
Each round tokenizes a set with both, alternating, and counts CPU time of this
process (one thread), so other load on the machine matters less than for wall
time.  "warm": the tokenizers have seen the set before (their caches hold its
words, the steady state of a long run); "cold": fresh tokenizers each round.
Prints medians over the rounds and checks that the ids are identical.

    python benchmarks/tokenize_throughput.py --rounds 5
"""
from __future__ import annotations

import argparse
import functools
import glob
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def document_lines():
    paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "*", "*.py")))
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            lines += [line.strip() for line in handle if line.strip()]
    return lines


def cpu_rate(count: int, work) -> float:
    started = time.process_time()
    work()
    return count / (time.process_time() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="generated captions")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from clip_throughput import make_pair_caption
    from open_clip.tokenizer import SimpleTokenizer

    from paircurate.transforms.clip_tokenize import FastClipTokenizer

    sets = {"generated": [make_pair_caption(i) for i in range(args.n)], "repository text": document_lines()}
    for name, captions in sets.items():
        reference, fast = SimpleTokenizer(), FastClipTokenizer(SimpleTokenizer())
        if not torch.equal(reference(captions), fast(captions)):
            raise SystemExit(f"token ids differ on {name}")
        rates = {"open_clip warm": [], "fast warm": [], "open_clip cold": [], "fast cold": []}
        for _ in range(args.rounds):
            rates["open_clip warm"].append(cpu_rate(len(captions), functools.partial(reference, captions)))
            rates["fast warm"].append(cpu_rate(len(captions), functools.partial(fast, captions)))
            fresh_ref, fresh_fast = SimpleTokenizer(), FastClipTokenizer(SimpleTokenizer())
            rates["open_clip cold"].append(cpu_rate(len(captions), functools.partial(fresh_ref, captions)))
            rates["fast cold"].append(cpu_rate(len(captions), functools.partial(fresh_fast, captions)))
        medians = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{name}: {len(captions):,} captions, {sum(map(len, captions)) / len(captions):.0f} chars on average, "
              f"ids identical")
        for state in ("warm", "cold"):
            ref_rate, fast_rate = medians[f"open_clip {state}"], medians[f"fast {state}"]
            print(f"  {state}: open_clip {ref_rate:>9,.0f} captions/s, fast {fast_rate:>9,.0f} captions/s "
                  f"({fast_rate / ref_rate:.1f}x; per round "
                  + ", ".join(f"{f / r:.1f}" for f, r in zip(rates[f'fast {state}'], rates[f'open_clip {state}']))
                  + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
