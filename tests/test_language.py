"""Caption language: detect(), the folding of model labels into ISO 639-1, the filter and its config."""
import re

import pytest

from paircurate.config import ConfigError, load_config
from paircurate.transforms import language
from paircurate.transforms.language import (
    DETECTABLE,
    MAX_CHARS,
    UNDETERMINED,
    apply_language,
    check_input,
    detect,
    detector,
    filter_error,
    iso639_1,
    language_text,
)
from paircurate.transforms.schema import Status, new_record

#: Short captions of known language (3-10 words), two a language.
CAPTIONS = {
    "en": ["a red bicycle leaning against a brick wall", "photo of a cat sleeping on the sofa"],
    "de": ["ein rotes Fahrrad lehnt an einer Backsteinmauer", "Foto einer Katze, die auf dem Sofa schläft"],
    "fr": ["un vélo rouge appuyé contre un mur de briques", "photo d'un chat qui dort sur le canapé"],
    "es": ["una bicicleta roja apoyada en una pared de ladrillos", "foto de un gato durmiendo en el sofá"],
    "it": ["una bicicletta rossa appoggiata a un muro di mattoni", "foto di un gatto che dorme sul divano"],
    "pt": ["uma bicicleta vermelha encostada numa parede de tijolos", "foto de um gato dormindo no sofá"],
    "nl": ["een rode fiets tegen een bakstenen muur", "foto van een kat die op de bank slaapt"],
    "ru": ["красный велосипед у кирпичной стены", "фото кошки, спящей на диване"],
    "pl": ["czerwony rower oparty o ceglaną ścianę", "zdjęcie kota śpiącego na kanapie"],
    "ja": ["レンガの壁に立てかけられた赤い自転車", "ソファで寝ている猫の写真"],
    "zh": ["靠在砖墙上的红色自行车", "在沙发上睡觉的猫的照片"],
    "ko": ["벽돌 벽에 기대어 있는 빨간 자전거", "소파에서 자고 있는 고양이 사진"],
}


@pytest.mark.parametrize("lang,caption", [(lang, c) for lang, cs in CAPTIONS.items() for c in cs])
def test_short_captions_get_their_language(lang, caption):
    code, score = detect(caption)
    assert code == lang, (caption, code, score)
    assert 0.5 <= score <= 1.0


@pytest.mark.parametrize("caption", [
    None, "", "   ", "\t\n", "https://example.com/images/photo-of-a-cat.jpg",
    "www.example.org/a/b", "12345 678", "2021-04-05 10:31", "me@example.com", "!!! ??? ...", 42,
])
def test_no_letters_no_caption_or_not_a_string_gives_nulls(caption):
    assert detect(caption) == (None, None)


def test_links_do_not_count():
    url = "https://example.com/the-quick-brown-fox-jumps-over-the-lazy-dog-photo"
    assert language_text(f"ein Haus {url} mit Garten") == "ein Haus mit Garten"
    assert detect(f"ein Haus {url} mit einem großen Garten")[0] == "de"


def test_long_captions_are_cut_to_max_chars():
    assert len(language_text("word " * 10_000)) <= MAX_CHARS
    assert detect("das ist ein sehr schönes Haus " * 2_000)[0] == "de"


def test_below_the_floor_the_language_is_null_but_the_score_stays():
    code, score = detect("Foto", min_score=0.0)
    assert code is not None and score < 0.5
    assert detect("Foto", min_score=0.5) == (None, score)
    assert detect(CAPTIONS["en"][0], min_score=0.5)[0] == "en"


def test_traditional_chinese_and_cantonese_are_zh():
    # The model has zh, yue (Cantonese) and wu labels; all three are ISO 639-1 zh.
    for caption in ["靠在磚牆上的紅色自行車", "我哋今日去咗海邊影相", "顯示本說明訊息"]:
        assert detect(caption)[0] == "zh", caption


def test_every_model_label_maps_to_a_detectable_code_or_none():
    labels = detector().labels
    codes = {iso639_1(label) for label in labels}
    assert codes - {None} == DETECTABLE
    assert all(len(code) == 2 and code.isalpha() and code.islower() for code in DETECTABLE)
    # A label the table does not know would be reported as itself: every 3-letter one is listed.
    assert all(len(label) == 2 or label in language.FOLDED or label in language.NO_ISO_639_1
               for label in labels)


def test_labels_without_iso_639_1_give_a_null_language():
    assert iso639_1("pcm") is None and iso639_1("zxx") is None
    assert iso639_1("yue") == "zh" and iso639_1("arz") == "ar" and iso639_1("en") == "en"


def brute_force_best(text):
    """The most probable ISO 639-1 group, summing every label's probability (no shortcut)."""
    totals = {}
    for label, probability in detector()._identifier.rank(text):
        group = iso639_1(label) or label
        totals[group] = totals.get(group, 0.0) + probability
    return max(totals.items(), key=lambda item: item[1])


@pytest.mark.parametrize("text", [c for cs in CAPTIONS.values() for c in cs] + [
    "Foto", "x", "IMG 2041", "我哋今日去咗海邊影相", "OK", "Ciao bella", "hola", "Tak", "Lorem ipsum dolor"])
def test_the_one_pass_shortcut_gives_the_full_ranking_answer(text):
    group, probability = detector().best(text)
    expected_group, expected_probability = brute_force_best(text)
    assert group == expected_group
    assert probability == pytest.approx(expected_probability, abs=1e-6)


# --- the filter ----------------------------------------------------------------

def record(caption, status=Status.OK):
    row = new_record("u1", "http://example.com/a.jpg", caption, "in.parquet", 0, {})
    row["status"] = status.value
    return row


def test_rows_in_an_unwanted_language_are_language_filtered_naming_it():
    row = apply_language(record(CAPTIONS["de"][1]), ["en"], 0.2)
    assert row["status"] == "language_filtered"
    assert row["caption_language"] == "de" and row["caption_language_score"] > 0.9
    assert re.fullmatch(r"de: score (0\.9\d|1\.00), not in \[en\]", row["error"])


def test_wanted_languages_stay_live_with_their_columns():
    for lang in ("en", "fr"):
        row = apply_language(record(CAPTIONS[lang][0]), ["en", "fr"], 0.2)
        assert row["status"] == "ok" and row["error"] is None
        assert row["caption_language"] == lang and 0.5 < row["caption_language_score"] <= 1


def test_no_filter_keeps_every_language():
    for captions in CAPTIONS.values():
        assert apply_language(record(captions[0]), [], 0.2)["status"] == "ok"
    assert apply_language(record("https://example.com/x.jpg"), [], 0.2)["status"] == "ok"


def test_undetermined_rows_are_und_and_kept_only_when_und_is_listed():
    url_only = record("https://example.com/x.jpg")
    row = apply_language(dict(url_only), ["en"], 0.2)
    assert row["status"] == "language_filtered" and row["error"] == "und: no letters, not in [en]"
    assert row["caption_language"] is None and row["caption_language_score"] is None
    assert apply_language(dict(url_only), ["en", "und"], 0.2)["status"] == "ok"
    low = apply_language(record("Foto"), ["en"], 0.9)
    assert low["status"] == "language_filtered" and low["caption_language"] is None
    assert low["error"].startswith("und: score 0.") and "below 0.9, not in [en]" in low["error"]


def test_filter_error_for_a_language_with_no_iso_639_1_code():
    assert filter_error(None, 0.8, 0.2, ["en"]) == (
        "und: score 0.80 for a language with no ISO 639-1 code, not in [en]")
    assert filter_error("en", 0.8, 0.2, ["en"]) is None
    assert filter_error(None, None, 0.2, ["und"]) is None


def test_rejected_rows_are_never_refiltered():
    caption_filtered = apply_language(record("Haus", Status.CAPTION_FILTERED), ["en"], 0.0)
    assert caption_filtered["status"] == "caption_filtered"
    assert caption_filtered["caption_language"] is not None  # a row with a caption gets the columns
    invalid = record('["not", "a", "string"]', Status.INVALID_INPUT)
    invalid = apply_language(invalid, ["en"], 0.0)
    assert invalid["status"] == "invalid_input" and invalid["caption_language"] is None


def test_input_without_captions_gets_nulls():
    row = apply_language(record(None), ["und"], 0.2, has_captions=False)
    assert row["status"] == "ok" and row["caption_language"] is None
    assert row["caption_language_score"] is None


# --- config ----------------------------------------------------------------------

def test_language_defaults():
    config = load_config()
    assert config.filter.detect_language is True and config.filter.languages == []
    assert config.filter.language_min_score == 0.2


def test_languages_accept_iso_codes_and_und():
    config = load_config(overrides=["filter.languages=[en, de, zh, und]"])
    assert config.filter.languages == ["en", "de", "zh", "und"]
    assert load_config(overrides=["filter.languages=en,fr"]).filter.languages == ["en", "fr"]


@pytest.mark.parametrize("bad", ["xx", "EN", "eng", "english", "en-US", ""])
def test_a_bad_language_is_a_config_error_naming_it(bad):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"filter.languages=[en, '{bad}']"])
    message = str(info.value)
    assert message.startswith(f"filter.languages: {bad!r} is not an ISO 639-1 code")
    assert "'und'" in message and "en, eo, es" in message


def test_languages_need_detection_on():
    with pytest.raises(ConfigError, match="filter.languages needs filter.detect_language: true"):
        load_config(overrides=["filter.languages=[en]", "filter.detect_language=false"])


@pytest.mark.parametrize("value", ["-0.1", "1.5", ".nan"])
def test_language_min_score_is_a_probability(value):
    with pytest.raises(ConfigError, match="filter.language_min_score=.* must be at least 0 and at most 1"):
        load_config(overrides=[f"filter.language_min_score={value}"])


def test_a_language_filter_on_input_without_captions_is_refused():
    with pytest.raises(ConfigError, match="no captions, so every row would be language_filtered"):
        check_input(["en"], has_captions=False)
    check_input(["en", UNDETERMINED], has_captions=False)
    check_input([], has_captions=False)
    check_input(["en"], has_captions=True)
