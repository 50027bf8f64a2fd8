"""open_clip's CLIP tokenizer: the same token ids, 5-9x faster on captions of familiar words.

open_clip's ``SimpleTokenizer`` spends about 50 us on a short caption, in three places: ftfy and
HTML unescaping (a quarter), splitting and byte-level BPE of every word (under half; BPE itself
is cached per word), and filling the output one row tensor at a time (a third). On the streaming
path that is a tenth of the cost of decoding a small JPEG, paid on the decode CPUs; wrapped,
5-10 us (BENCHMARKS.md "Data"; captions of never-seen words: no faster).

:class:`FastClipTokenizer` wraps it and keeps every result identical (``tests/test_tokens.py``
compares both on printable, non-ASCII, HTML-escaped, over-long and special-token captions):

- ftfy and ``html.unescape`` leave printable ASCII without ``&`` unchanged, so such captions skip
  them; any other caption takes open_clip's own cleaning;
- a word's ids are a function of the word alone (open_clip's byte-level BPE of it), so they are
  cached per word, up to ``CACHE_WORDS``; a word seen for the first time costs what it costs
  open_clip, less its share of ftfy;
- rows are written into one numpy array (open_clip makes a tensor per row).

Tokenizers other than ``SimpleTokenizer`` with its default cleaning (``lower``) and truncation
(the HF tokenizers of some open_clip models, reduction masks) are used as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower

CACHE_WORDS = 200_000  # words kept per process: ~60 MB with open_clip's own BPE cache of them


def _plain(text: str) -> bool:
    """True where ftfy and HTML unescaping would return ``text`` unchanged (then stripped)."""
    return text.isascii() and text.isprintable() and "&" not in text


class FastClipTokenizer:
    """Callable like open_clip's tokenizer: list of captions -> LongTensor (n, context_length)."""

    def __init__(self, base: SimpleTokenizer) -> None:
        self.base = base
        self.context_length: int = base.context_length
        self._ids: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        ids = self._ids.get(word)
        if ids is None:  # open_clip's per-word step of encode (the word is already clean)
            b = self.base
            pieces = b.bpe("".join(b.byte_encoder[c] for c in word.encode("utf-8")))
            ids = [b.encoder[piece] for piece in pieces.split(" ")]
            if len(self._ids) < CACHE_WORDS:
                self._ids[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, no start/end tokens: ``SimpleTokenizer.encode``'s result."""
        if not _plain(text):
            return self.base.encode(text)
        ids: list[int] = []
        for word in self.base.pat.findall(" ".join(text.split()).lower()):
            ids.extend(self._word(word))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        n_ctx = context_length or self.context_length
        sot, eot = self.base.sot_token_id, self.base.eot_token_id
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: n_ctx - 2]
            out[i, 0] = sot
            out[i, 1 : len(ids) + 1] = ids
            out[i, len(ids) + 1] = eot  # truncation ends on eot, as open_clip's does
        return torch.from_numpy(out)


def fast(tokenizer: Any) -> Any:
    """``tokenizer`` made fast where it is open_clip's CLIP tokenizer with default settings."""
    if (
        type(tokenizer) is SimpleTokenizer
        and tokenizer.reduction_fn is None
        and tokenizer.clean_fn is _clean_lower
    ):
        return FastClipTokenizer(tokenizer)
    return tokenizer
