"""The fast caption tokenizer gives open_clip's token ids exactly, and is used only where it can."""
from __future__ import annotations

import html
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ftfy  # noqa: E402
import open_clip  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

from paircurate.transforms import clip_model  # noqa: E402
from paircurate.transforms.clip_tokenize import FastClipTokenizer, fast_tokenizer, is_plain  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("a photo of the red dog cat car house tree beach people man woman child playing near with "
         "under vintage modern 4k HD 1920x1080 img_2034.jpg www.example.com/path?q=1 #sunset @user "
         "it's don't they're we've I'm you'll he'd IT'S 'S 'Twas rock'n'roll").split()
UNICODE = ("café", "naïve", "Straße", "ÉTÉ", "日本語のテキスト", "北京烤鸭", "한국어", "Привет", "Ελληνικά",
           "العربية", "हिन्दी", "ไทย", "😀", "🎉🎉", "👩‍👩‍👧", "👍🏽", "🇫🇷", "e\u0301", "ﬁne", "ｆｕｌｌｗｉｄｔｈ",
           "１２３", "x²", "Ⅻ", "½", "“quoted”", "‘single’", "—", "…", "\u00a0", "\u3000", "\u2028",
           "\u200b", "\ufeff", "İstanbul", "ǅ", "K", "'ſ", "\u0345", "ß", "Ǆ", "ﬃ", "№", "™", "©",
           "cafÃ©", "â€™", "Ã¼ber", "\x85", "\u0130")
ENTITIES = ("&amp;", "&lt;b&gt;", "&#39;", "&#x2019;", "&nbsp;", "&amp;amp;", "&amp;lt;", "&quot;", "&copy;",
            "&hellip;", "&", "&;", "&#0;", "&unknown;", "Tom &amp; Jerry", "a&b", "<b>bold</b>")
CONTROLS = ("\r\n", "\r", "\t", "\n", "\x0b", "\x0c", "\x00", "\x07", "\x1b[31m", "\x1b", "\x7f", "\x1c", "\x1f")
SPECIALS = ("<start_of_text>", "<end_of_text>", "!<end_of_text>", "<END_OF_TEXT>", "x<start_of_text>y",
            "<start_of_text", "<|endoftext|>", "</w>", "a</w>")


def generated_captions(n: int, seed: int = 0):
    """Captions mixing plain words with unicode, entities, controls, special tokens, odd lengths."""
    rng = random.Random(seed)
    pools = [WORDS] * 6 + [UNICODE, ENTITIES, CONTROLS, SPECIALS, tuple(".,;:!?()[]{}'\"-_/\\|*#$%^~`+=<>0123456789")]
    out = []
    for _ in range(n):
        length = rng.choice([0, 1, 2, 5, 8, 12, 20, 40, 80, 200])
        parts = []
        for _ in range(length):
            pool = rng.choice(pools)
            parts.append(rng.choice(pool))
        joiner = rng.choice([" ", " ", " ", "", "  ", "\t", "\n"])
        text = joiner.join(parts)
        if rng.random() < 0.2:
            text = rng.choice([" ", "\n", "\t\t", "\u00a0"]) + text + rng.choice(["", " ", "  \n"])
        if rng.random() < 0.1:
            text = text.upper()
        out.append(text)
    return out + ["", " ", "\n\n", "   \t ", "a", "A", "0", "'", "''", "&", "<", "<end_of_text>",
                  "word " * 300, "x" * 500, "1" * 100, "é" * 100, "🙂" * 100, "supercalifragilistic" * 20]


def document_lines():
    """Real prose, code and tables from this repository's own files."""
    lines = []
    for name in ("README.md", "pyproject.toml", "pipeline/config.py", "transforms/clip_model.py"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
            lines += [line for line in handle.read().splitlines() if line.strip()]
    return lines


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def test_ids_match_open_clip_on_varied_captions(reference):
    captions = generated_captions(3000) + document_lines()
    assert len(captions) > 4000
    fast = fast_tokenizer(reference)
    assert isinstance(fast, FastClipTokenizer)
    expected = reference(captions)
    first = fast(captions)
    assert first.dtype == torch.long and first.shape == (len(captions), 77)
    assert torch.equal(first, expected)
    # Again with every chunk cached, and in another order and batching.
    order = list(range(len(captions)))
    random.Random(1).shuffle(order)
    again = torch.cat([fast([captions[i] for i in order[s:s + 97]]) for s in range(0, len(order), 97)])
    assert torch.equal(again, expected[order])
    # The caption set exercises what it should: cuts, non-plain text, specials, empties.
    lengths = (expected != 0).sum(dim=1)
    assert (lengths == 77).sum() > 100 and (lengths == 2).sum() > 5
    assert sum(not is_plain(c) for c in captions) > 1000
    assert (expected == reference.eot_token_id).sum(dim=1).max() > 1  # "<end_of_text>" inside text


@pytest.mark.parametrize("context_length", [2, 3, 16, 77])
def test_cut_keeps_end_token_last_like_open_clip(reference, context_length):
    captions = generated_captions(300, seed=5)
    fast = FastClipTokenizer(reference, cache_size=50)  # small: the cache starts over many times
    assert torch.equal(fast(captions, context_length), reference(captions, context_length))
    assert torch.equal(fast(captions[7]), reference(captions[7]))  # a single string, like open_clip


def test_plain_text_is_what_ftfy_and_unescape_leave_alone():
    # Every ASCII character, alone and between letters and spaces.
    for code in range(128):
        c = chr(code)
        for text in (c, f"a{c}b", f" {c}{c} ", f"x{c}\n{c}y"):
            if is_plain(text):
                assert ftfy.fix_text(text) == text, repr(text)
                assert html.unescape(text) == text, repr(text)
    rng = random.Random(3)
    alphabet = "".join(chr(c) for c in range(32, 127)) + "\t\n"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if is_plain(text):
            assert ftfy.fix_text(text) == text and html.unescape(text) == text, repr(text)
    assert not is_plain("caf\u00e9") and not is_plain("a &amp; b") and not is_plain("a\rb")


def test_only_the_standard_clip_bpe_gets_the_fast_tokenizer(reference):
    assert fast_tokenizer(reference) is not None
    assert fast_tokenizer(SimpleTokenizer(clean="canonicalize")) is None
    assert fast_tokenizer(SimpleTokenizer(reduction_mask="simple")) is None
    assert fast_tokenizer(SimpleTokenizer(context_length=None)) is None

    class OtherTokenizer:  # e.g. open_clip's HFTokenizer or SigLipTokenizer
        context_length = 64

    assert fast_tokenizer(OtherTokenizer()) is None


def test_fast_tokenizer_delegates_the_rest(reference):
    fast = fast_tokenizer(reference)
    assert fast.vocab_size == reference.vocab_size and fast.context_length == 77
    assert fast.sot_token_id == reference.sot_token_id
    assert fast.decode(fast.encode("a red dog")) == reference.decode(reference.encode("a red dog"))


def test_loaded_model_tokenizes_with_the_fast_tokenizer():
    config = clip_model.ClipConfig(model_config="paircurate-tiny", pretrained="none", device="cpu",
                                   preprocess_threads=1)
    loaded = clip_model.load_clip(config)
    try:
        assert isinstance(loaded.tokenizer, FastClipTokenizer)
        captions = generated_captions(50, seed=9)
        assert torch.equal(loaded.tokenizer(captions), open_clip.get_tokenizer("paircurate-tiny")(captions))
    finally:
        loaded.close()
