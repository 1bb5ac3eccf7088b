"""Caption tokenization for CLIP models: open_clip's token ids, with less Python per caption.

open_clip's SimpleTokenizer cleans every caption with ftfy and a double HTML
unescape, splits it with a regex, maps each word's UTF-8 bytes to symbols and
looks its BPE up in a cache, one Python step per byte and per token: about
20,000 captions/s on one core, and on a GPU host the one Python thread that
tokenizes a batch is what limits a worker process.

``FastClipTokenizer`` gives the same ids for the same tokenizer, reusing that
tokenizer's own regex, byte table, BPE and vocabulary, and saves work in two
places:

* cleaning: a caption of plain ASCII (printable characters, tab and newline,
  no ``&``) is one that ftfy and the HTML unescape leave unchanged, so only
  the whitespace collapse and lower-casing run on it; any other caption goes
  through open_clip's own cleaning function.
* words: open_clip's split regex never matches across a space, so the ids of
  a cleaned caption are the ids of its space-separated chunks, one after the
  other; each chunk's ids are computed once (open_clip's regex, byte table
  and BPE) and kept in a bounded dictionary.  Captions repeat most of their
  chunks ("a", "photo", "of", "the", "dog,"), so most chunks cost one lookup.

Then the start token, the cut to the context length with the end token last
(chunks past the cut are not tokenized at all), and zero padding, as open_clip
does.  ``fast_tokenizer(tokenizer)`` decides once per model: None (use
open_clip's tokenizer as it is) unless the tokenizer is a plain
SimpleTokenizer with the default cleaning and no token reduction.  The Rust
BPE of Hugging Face ``tokenizers`` was measured too and was slower than the
chunk cache (it builds an encoding object with offsets per caption), so it is
not used.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

#: Characters that no ftfy fix and no HTML unescape changes: printable ASCII but "&" (an
#: entity's start), tab and newline.  ftfy changes ASCII text only through entities, CR
#: (line breaks), ESC sequences and control characters, all outside this set.
_NOT_PLAIN = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")
#: Chunks kept per tokenizer; when full the cache starts again (bounded memory, no LRU upkeep).
CHUNK_CACHE_SIZE = 1 << 17


def is_plain(text: str) -> bool:
    """Whether ftfy.fix_text and html.unescape leave ``text`` unchanged, on a cheap test."""
    return _NOT_PLAIN.search(text) is None


class FastClipTokenizer:
    """Callable like open_clip's SimpleTokenizer: captions -> LongTensor [n, context_length].

    Anything else (``encode``, ``decode``, ``vocab_size``...) is the wrapped tokenizer's.
    Safe to call from several threads (a chunk two threads miss at once is computed twice).
    """

    def __init__(self, reference: Any, cache_size: int = CHUNK_CACHE_SIZE):
        self.reference = reference
        self._cache: Dict[str, Tuple[int, ...]] = {}
        self._cache_size = cache_size

    def __getattr__(self, name: str):  # only called for what this class does not define
        if name.startswith("_") or name == "reference":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.reference, name)

    def chunk_ids(self, chunk: str) -> Tuple[int, ...]:
        """The ids of one space-free piece of cleaned text (open_clip's encode loop, cached)."""
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        ref = self.reference
        out: List[int] = []
        for token in ref.pat.findall(chunk):
            symbols = "".join(ref.byte_encoder[b] for b in token.encode("utf-8"))
            out.extend(ref.encoder[piece] for piece in ref.bpe(symbols).split(" "))
        ids = tuple(out)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def chunks(self, text: str) -> List[str]:
        """The space-separated pieces of the cleaned caption (open_clip's cleaning, or its shortcut)."""
        if is_plain(text):
            return text.lower().split()
        return self.reference.clean_fn(text).split()

    def caption_ids(self, text: str, context_length: int) -> List[int]:
        """Start token, the caption's tokens, end token: at most ``context_length``, end token last."""
        ids = [self.reference.sot_token_id]
        room = context_length - 1
        cache, chunk_ids = self._cache, self.chunk_ids
        for chunk in self.chunks(text):
            ids += cache.get(chunk) or chunk_ids(chunk)
            if len(ids) >= room:
                del ids[room:]
                break
        ids.append(self.reference.eot_token_id)
        return ids

    def ids(self, texts: Sequence[str], context_length: Optional[int] = None) -> np.ndarray:
        """int64 [n, context_length] token ids, zero padded."""
        length = context_length or self.reference.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.caption_ids(text, length)
            out[row, :len(ids)] = ids
        return out

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        return torch.from_numpy(self.ids(texts, context_length))


def fast_tokenizer(tokenizer: Any) -> Optional[FastClipTokenizer]:
    """A FastClipTokenizer over ``tokenizer`` when it is open_clip's standard CLIP BPE, else None.

    Other tokenizers (Hugging Face ones, SigLIP's, a SimpleTokenizer with another
    cleaning or a token reduction) have other rules: they stay as they are.
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return None
    if (type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "clean_fn", None) is not _clean_lower
            or getattr(tokenizer, "reduction_fn", None) is not None
            or (tokenizer.context_length or 0) < 2):
        return None
    return FastClipTokenizer(tokenizer)
