"""The fast CLIP tokenizer gives open_clip's token ids for every caption, whichever path it takes.

open_clip's own ``SimpleTokenizer`` is the reference: each test tokenizes the same captions with
both and compares the whole id tensors.
"""

from __future__ import annotations

import random
import string

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clipray.config.schema import SyntheticData
from clipray.core import tokens
from clipray.core.model import tokenizer
from clipray.core.synthetic import synthetic_image

EDGE_CASES = [
    "",
    "   ",
    "a",
    "A Photo Of  a DOG\tin\nthe park ",
    "it's what'S they're we've I'm you'll he'd 'S",
    "x.'s 's' 'l ''",
    "&amp; &lt;b&gt; &#39;quoted&#39; AT&T & co",
    "<start_of_text> inside <end_of_text> a caption",
    "Ünïcödé “curly quotes” ﬁne ligature — dash",
    "mojibake: cafÃ© and â€œquotedâ€\x9d",
    "control\x1b[31m red\x1b[0m and \r\n line breaks \x00 \x7f",
    "fullwidth ＡＢＣ and non-breaking\u00a0space",
    "12 3.5 1,000 2026-11-30 #hashtag @user http://example.com/a?b=c",
    "word " * 100,  # over the context length: truncated, ending on end-of-text
]


def random_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.printable + "&;#'<>_" * 4 + "éü—“”ﬁ\u00a0\x1b\r\x00ＡÃ"
    words = "a photo of the dog cat on red small large left top 12 3.5 it's don't &amp;".split()
    out = []
    for i in range(n):
        if i % 2:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))))
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[SimpleTokenizer, tokens.FastClipTokenizer]:
    base = open_clip.get_tokenizer("ViT-B-32")
    fast = tokens.fast(open_clip.get_tokenizer("ViT-B-32"))
    assert isinstance(fast, tokens.FastClipTokenizer)
    return base, fast


@pytest.mark.parametrize("caption", EDGE_CASES)
def test_edge_cases_give_open_clips_ids(pair, caption):
    base, fast = pair
    assert torch.equal(fast([caption]), base([caption]))
    assert torch.equal(fast(caption), base(caption))  # a single string, as open_clip accepts


def test_random_captions_give_open_clips_ids(pair):
    base, fast = pair
    captions = random_captions(6000)
    assert sum(not tokens._plain(c) for c in captions) > 1000  # both paths are exercised
    assert torch.equal(fast(captions), base(captions))


def test_synthetic_captions_give_open_clips_ids(pair):
    base, fast = pair
    cfg = SyntheticData()
    captions = [c for i in range(64) for c in synthetic_image(cfg, "train", i)[1]]
    assert torch.equal(fast(captions), base(captions))


@pytest.mark.parametrize("context_length", [2, 5, 16, 77])
def test_a_shorter_context_truncates_as_open_clip_does(pair, context_length):
    base, fast = pair
    captions = EDGE_CASES + random_captions(200, seed=1)
    assert torch.equal(fast(captions, context_length), base(captions, context_length))


def test_the_word_cache_is_bounded_and_results_do_not_depend_on_it(pair, monkeypatch):
    base, _ = pair
    monkeypatch.setattr(tokens, "CACHE_WORDS", 10)
    small = tokens.FastClipTokenizer(base)
    captions = random_captions(500, seed=2)
    assert torch.equal(small(captions), base(captions))
    assert len(small._ids) == 10


def test_other_tokenizer_settings_are_used_as_they_are():
    for other in (
        SimpleTokenizer(clean="whitespace"),
        SimpleTokenizer(reduction_mask="simple"),
    ):
        assert tokens.fast(other) is other


def test_clipray_models_tokenize_with_the_fast_tokenizer_and_it_pickles_as_a_name():
    import pickle

    tok = tokenizer("clipray-tiny-vit")
    base = open_clip.get_tokenizer("clipray-tiny-vit")
    captions = random_captions(100, seed=3)
    assert torch.equal(tok(captions), base(captions))
    assert len(pickle.dumps(tok)) < 200
