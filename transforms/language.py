"""Caption language: an ISO 639-1 code and its probability, and the language filter.

The detector is py3langid (langid.py's naive Bayes over byte n-grams): its
model ships inside its wheel, nothing is downloaded, and it needs only numpy.
benchmarks/language_id.py compares it with fastText's lid.176.ftz, lingua and
langdetect on short captions (README, "Caption language").

Every caption gets ``caption_language`` (an ISO 639-1 code, or None) and
``caption_language_score`` (the probability of the most probable language).
Labels the model reports in ISO 639-3 are folded into their ISO 639-1
macrolanguage where there is one (Cantonese and Wu into ``zh``, Egyptian and
Moroccan Arabic into ``ar``, ...) and their probabilities added up; labels
with no ISO 639-1 code (Nigerian Pidgin, Ligurian, ``zxx`` "no linguistic
content", ...) count as no language.
"""
from __future__ import annotations

import collections
import re
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import apache_beam as beam

from paircurate.transforms.schema import Status, is_live, mark
from paircurate.transforms.settings import ConfigError

#: What ``filter.languages`` calls a caption with no detected language.
UNDETERMINED = "und"
#: Model labels (ISO 639-3) folded into an ISO 639-1 code: the code itself for the same language,
#: else the macrolanguage the label is a member of (ISO 639-3's macrolanguage mappings).
FOLDED: Dict[str, str] = {
    "ary": "ar", "arz": "ar",    # Moroccan, Egyptian Arabic
    "fuv": "ff",                 # Nigerian Fulfulde
    "gug": "gn",                 # Paraguayan Guarani
    "kik": "ki",                 # Kikuyu
    "ltg": "lv",                 # Latgalian
    "sdh": "ku",                 # Southern Kurdish
    "uzs": "uz",                 # Southern Uzbek
    "wuu": "zh", "yue": "zh",    # Wu, Cantonese
}
#: Model labels with no ISO 639-1 code, neither their own nor a macrolanguage's.
NO_ISO_639_1 = frozenset({
    "ace", "bcl", "crh", "ext", "gcf", "gcr", "gom", "grc", "guw", "hbo", "kab", "lij", "nso",
    "pcm", "vec", "zxx",
})
#: The ISO 639-1 codes the detector can report (tests check this against the model's labels).
DETECTABLE = frozenset(
    "af am an ar as az ba be bg bn br bs ca cs cy da de dz el en eo es et eu fa ff fi fo fr fy "
    "ga gd gl gn gu ha he hi hr ht hu hy id ig is it ja jv ka ki kk km kn ko ku ky la lb lg ln "
    "lo lt lv mg mk ml mn mr ms mt my ne nl nn no oc om or pa pl ps pt qu ro ru rw sa se si sk sl "
    "sn so sq sr st sv sw ta te tg th tk tl tr tt ug uk ur uz vi vo wa xh yo zh zu".split())
#: Only the start of a long caption is looked at: enough to tell its language, and the
#: cost stays bounded (the detector's time grows with the text's bytes).
MAX_CHARS = 1000
#: URLs and e-mail addresses say nothing about the caption's language (and look English).
_LINKS = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]*://|www\.)\S+|\S+@\S+\.\S+")

_detector = None
_lock = threading.Lock()


class LanguageDetector:
    """py3langid with its labels grouped by ISO 639-1 code (a label with none is a group alone)."""

    def __init__(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.labels = list(self._identifier.labels)
        self._group = {label: iso639_1(label) or label for label in self.labels}
        sizes = collections.Counter(self._group.values())
        self._alone = {label for label, group in self._group.items() if sizes[group] == 1}

    def best(self, text: str) -> Tuple[str, float]:
        """The most probable group (ISO 639-1 code, or a label that has none) and its probability."""
        label, probability = self._identifier.classify(text)
        # A label alone in its group with half the probability or more beats any group's
        # sum: one model pass (27 us) instead of ranking all labels (about 3 times as long).
        if label in self._alone and probability >= 0.5:
            return self._group[label], probability
        totals: Dict[str, float] = {}
        for label, probability in self._identifier.rank(text):
            group = self._group[label]
            totals[group] = totals.get(group, 0.0) + probability
        return max(totals.items(), key=lambda item: item[1])


def detector() -> LanguageDetector:
    """The process's detector, loaded once (about 1 s: the model is decompressed)."""
    global _detector
    with _lock:
        if _detector is None:
            _detector = LanguageDetector()
    return _detector


def iso639_1(label: str) -> Optional[str]:
    """The ISO 639-1 code of a model label, or None (a language without one)."""
    if label in NO_ISO_639_1:
        return None
    return FOLDED.get(label, label)


def language_text(caption: Any) -> str:
    """The part of a caption that tells its language: links removed, at most MAX_CHARS."""
    if not isinstance(caption, str):
        return ""
    return " ".join(_LINKS.sub(" ", caption[:MAX_CHARS]).split())


def detect(caption: Any, min_score: float = 0.0) -> Tuple[Optional[str], Optional[float]]:
    """(ISO 639-1 code or None, probability of the most probable language or None).

    Labels that share an ISO 639-1 code (zh, yue, wuu) count as one language, their
    probabilities added up. The code is None when the most probable language has no
    ISO 639-1 code or its probability is below ``min_score``; both are None for a caption with no
    letters once links are removed (empty, whitespace, a URL, numbers).
    """
    text = language_text(caption)
    if not any(ch.isalpha() for ch in text):
        return None, None
    group, score = detector().best(text)
    score = min(max(float(score), 0.0), 1.0)  # float sums of probabilities may stray past 1
    return (group if group in DETECTABLE and score >= min_score else None), score


def check_languages(languages: Sequence[str]) -> None:
    """A ConfigError naming the first entry of ``filter.languages`` that the detector never reports."""
    for entry in languages:
        if entry != UNDETERMINED and entry not in DETECTABLE:
            raise ConfigError(
                f"filter.languages: {entry!r} is not an ISO 639-1 code the language detector "
                f"reports; use lower-case codes from: {', '.join(sorted(DETECTABLE))}, "
                f"or {UNDETERMINED!r} for captions with no detected language")


def filter_error(code: Optional[str], score: Optional[float], min_score: float,
                 languages: Sequence[str]) -> Optional[str]:
    """The error of a row whose language is not wanted ("de: score 0.98, not in [en]"), or None."""
    if not languages or (code or UNDETERMINED) in languages:
        return None
    wanted = "[" + ", ".join(languages) + "]"
    if code:
        return f"{code}: score {score:.2f}, not in {wanted}"
    if score is None:
        return f"{UNDETERMINED}: no letters, not in {wanted}"
    if score < min_score:
        return f"{UNDETERMINED}: score {score:.2f} below {min_score:g}, not in {wanted}"
    return f"{UNDETERMINED}: score {score:.2f} for a language with no ISO 639-1 code, not in {wanted}"


def apply_language(record: Dict[str, Any], languages: Sequence[str], min_score: float,
                   has_captions: bool = True) -> Dict[str, Any]:
    """Set the language columns of a record with a caption; mark a live one language_filtered
    when its language is not in ``languages`` (empty: every language is kept).

    Rows rejected for their input (invalid_input) keep null columns: their caption
    may be a non-string's JSON text. caption_filtered rows get the columns too, but
    only a live row can be filtered.
    """
    if record["status"] == Status.INVALID_INPUT.value:
        return record
    code = score = None
    if has_captions:
        code, score = detect(record.get("caption"), min_score)
        record["caption_language"], record["caption_language_score"] = code, score
    if is_live(record):
        error = filter_error(code, score, min_score, languages)
        if error:
            mark(record, Status.LANGUAGE_FILTERED, error)
    return record


def check_input(languages: Sequence[str], has_captions: bool) -> None:
    """Refuse a language filter on input without captions (txt): it would filter every row."""
    if languages and UNDETERMINED not in languages and not has_captions:
        raise ConfigError("filter.languages is set but the input (plain text, one URL a line) has "
                          "no captions, so every row would be language_filtered; unset it or add "
                          f"{UNDETERMINED!r}")


class _LanguageFn(beam.DoFn):
    def __init__(self, languages: Sequence[str], min_score: float, has_captions: bool):
        self._languages = list(languages)
        self._min_score = min_score
        self._has_captions = has_captions

    def setup(self):
        if self._has_captions:
            detector()  # load the model before the first row, not inside the first bundle's timing
        self._filtered = beam.metrics.Metrics.counter("language", "filtered")

    def process(self, record):
        before = record["status"]
        record = apply_language(record, self._languages, self._min_score, self._has_captions)
        if record["status"] != before:
            self._filtered.inc()
        yield record


class DetectLanguage(beam.PTransform):
    """caption -> caption_language, caption_language_score; unwanted languages -> language_filtered.

    Runs right after validation, before anything is fetched, so a filtered row
    costs no download.
    """

    def __init__(self, languages: Sequence[str], min_score: float, has_captions: bool = True):
        super().__init__()
        self._fn = _LanguageFn(languages, min_score, has_captions)

    def expand(self, records):
        return records | "Detect" >> beam.ParDo(self._fn)

