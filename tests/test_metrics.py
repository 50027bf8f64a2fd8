"""Tests for clipray.metrics: recall against a brute-force reference, aggregates by hand, keys."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipray.core.metrics import (
    DEFAULT_KS,
    agg_key,
    cell_key,
    cell_table,
    clean_key,
    corruption_summary,
    flatten_cell_metrics,
    flatten_clean,
    flatten_summary,
    parse_cell_key,
    per_corruption_key,
    query_ranks,
    recall_from_ranks,
    recall_key,
    retrieval_recall,
    unflatten_cell_metrics,
)

DEFAULT_KEYS = ["i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"]


# ---------------------------------------------------------------- brute-force reference
def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _rank(scores: list[float], pos: int) -> int:
    """Candidates ranked above `pos`: strictly greater score, or equal score and lower index."""
    return sum(1 for c, s in enumerate(scores) if s > scores[pos] or (s == scores[pos] and c < pos))


def brute_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> tuple[list, list]:
    images, texts, owner = img.tolist(), txt.tolist(), t2i.tolist()
    sims = [[_dot(i, t) for t in texts] for i in images]
    i2t_ranks = [
        min(_rank(sims[i], j) for j, o in enumerate(owner) if o == i) for i in range(len(images))
    ]
    t2i_ranks = [
        _rank([sims[i][j] for i in range(len(images))], owner[j]) for j in range(len(texts))
    ]
    return i2t_ranks, t2i_ranks


def brute_recall(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks) -> dict[str, float]:
    i2t_ranks, t2i_ranks = brute_ranks(img, txt, t2i)
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_R{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def random_dataset(
    seed: int,
    n_images: int = 12,
    dim: int = 6,
    quantised: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """1-5 captions per image in shuffled order; quantised: few distinct values + duplicate rows."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    owner = [i for i in range(n_images) for _ in range(rng.randint(1, 5))]
    rng.shuffle(owner)
    t2i = torch.tensor(owner)
    if quantised:  # multiples of 1/4 in [-1, 1]: every dot product is exact, so ties are real
        img = torch.randint(-4, 5, (n_images, dim), generator=gen).to(dtype) / 4
        txt = torch.randint(-4, 5, (len(owner), dim), generator=gen).to(dtype) / 4
        img[1::3] = img[0]  # duplicate images
        txt[1::4] = txt[0]  # duplicate captions
    else:
        img = F.normalize(torch.randn(n_images, dim, generator=gen, dtype=dtype), dim=1)
        noise = torch.randn(len(owner), dim, generator=gen, dtype=dtype)
        txt = F.normalize(img[t2i] + noise, dim=1)
    return img, txt, t2i


def ties_with_the_positive(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> int:
    """How many (caption, other image) pairs score exactly as the caption's own image does."""
    sims = (img @ txt.T).tolist()
    return sum(
        sims[o][j] == sims[i][j]
        for j, o in enumerate(t2i.tolist())
        for i in range(len(img))
        if i != o
    )


# ---------------------------------------------------------------- retrieval_recall
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed: int, quantised: bool) -> None:
    img, txt, t2i = random_dataset(seed, quantised=quantised)
    if quantised:  # the tie cases must actually tie with positives, or they test nothing
        assert ties_with_the_positive(img, txt, t2i) > 5
    ks = (1, 2, 3, 5, 10, 100)
    got = retrieval_recall(img, txt, t2i, ks=ks)
    assert got == pytest.approx(brute_recall(img, txt, t2i, ks), abs=1e-9)


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_query_ranks_match_brute_force_and_give_the_same_recall(chunk_size, quantised) -> None:
    """The per-query ranks a paired bootstrap resamples: each query's own, in query order."""
    img, txt, t2i = random_dataset(3, quantised=quantised)
    i2t, t2i_ranks = query_ranks(img, txt, t2i, chunk_size)
    assert (i2t.tolist(), t2i_ranks.tolist()) == brute_ranks(img, txt, t2i)
    assert recall_from_ranks(i2t, t2i_ranks) == retrieval_recall(img, txt, t2i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantised_float32_and_float64_agree_with_brute_force(dtype: torch.dtype) -> None:
    img, txt, t2i = random_dataset(7, n_images=20, quantised=True, dtype=dtype)
    assert retrieval_recall(img, txt, t2i) == pytest.approx(
        brute_recall(img.double(), txt.double(), t2i, DEFAULT_KS), abs=1e-9
    )


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
def test_chunked_equals_unchunked(chunk_size: int | None, quantised: bool) -> None:
    img, txt, t2i = random_dataset(3, n_images=150, dim=8, quantised=quantised, dtype=torch.float32)
    whole = retrieval_recall(img, txt, t2i, chunk_size=10**6)
    assert retrieval_recall(img, txt, t2i, chunk_size=chunk_size) == whole


def test_identity_embeddings_give_perfect_recall() -> None:
    eye = torch.eye(5)
    got = retrieval_recall(eye, eye.clone(), torch.arange(5))
    assert list(got) == DEFAULT_KEYS
    assert got == {**{k: 100.0 for k in DEFAULT_KEYS[:-1]}, "rsum": 600.0}


def test_positive_at_rank_two_misses_r1_hits_r5() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # caption 0 -> image 0, caption 1 -> image 1
    got = retrieval_recall(images, texts, torch.tensor([0, 1]), ks=(1, 2, 5))
    assert got == {
        "i2t_R1": 0.0,
        "i2t_R2": 100.0,
        "i2t_R5": 100.0,
        "t2i_R1": 0.0,
        "t2i_R2": 100.0,
        "t2i_R5": 100.0,
        "rsum": 400.0,
    }


def test_any_caption_counts_for_image_to_text() -> None:
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 0.0, 1.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.0]])
    # image 0 owns captions 0 (ranked last) and 1 (ranked first): a hit through caption 1;
    # image 1 owns caption 2 (hit); image 2 owns caption 3, but ranks caption 0 first (miss)
    got = retrieval_recall(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1,))
    assert got["i2t_R1"] == pytest.approx(200 / 3)  # images 0 and 1 hit, image 2 misses
    assert got["t2i_R1"] == 50.0  # captions 1 and 2 hit


def test_ties_break_towards_lower_index() -> None:
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical images
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # caption 0 -> image 1, caption 1 -> image 0
    got = retrieval_recall(images, texts, torch.tensor([1, 0]), ks=(1,))
    assert got["t2i_R1"] == 50.0  # caption 0's positive (index 1) loses the tie to image 0
    assert got["i2t_R1"] == 50.0  # image 0's caption (index 1) loses the tie to caption 0


def test_half_precision_and_int32_labels() -> None:
    img, txt, t2i = random_dataset(2, quantised=True, dtype=torch.float16)
    expected = brute_recall(img.double(), txt.double(), t2i, DEFAULT_KS)
    assert retrieval_recall(img, txt, t2i.int()) == pytest.approx(expected, abs=1e-9)


def _bad_inputs():
    img, txt, t2i = torch.eye(3), torch.eye(3), torch.arange(3)
    return [
        ("dim", dict(text_emb=torch.ones(3, 4))),
        ("2-D float", dict(image_emb=torch.ones(3))),
        ("2-D float", dict(image_emb=torch.ones(3, 3, dtype=torch.long))),
        ("2-D float", dict(text_emb=np.eye(3))),
        ("non-empty", dict(image_emb=torch.ones(0, 3))),
        ("non-empty", dict(text_emb=torch.ones(0, 3), text_to_image=torch.ones(0).long())),
        ("NaN", dict(text_emb=torch.tensor([[math.nan, 0, 0], [0, 1, 0], [0, 0, 1]]))),
        ("shape", dict(text_to_image=torch.arange(2))),
        ("int tensor", dict(text_to_image=torch.arange(3.0))),
        ("int tensor", dict(text_to_image=torch.tensor([True, False, True]))),
        ("in \\[0, 3\\)", dict(text_to_image=torch.tensor([0, 1, 3]))),
        ("in \\[0, 3\\)", dict(text_to_image=torch.tensor([-1, 1, 2]))),
        ("no caption", dict(text_to_image=torch.tensor([0, 0, 2]))),
        ("ks", dict(ks=(0, 5))),
        ("ks", dict(ks=(1, 1))),
        ("ks", dict(ks=())),
        ("ks", dict(ks=(1.0,))),
        ("chunk_size", dict(chunk_size=0)),
        ("chunk_size", dict(chunk_size=2.5)),
    ], dict(image_emb=img, text_emb=txt, text_to_image=t2i)


@pytest.mark.parametrize("match,override", _bad_inputs()[0])
def test_invalid_input_raises(match: str, override: dict) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_recall(**{**_bad_inputs()[1], **override})


# ---------------------------------------------------------------- corruption aggregates
CLEAN = {"rsum": 500.0}
CORRUPTED = {
    ("fog", 1): {"rsum": 400.0},
    ("fog", 2): {"rsum": 300.0},
    ("blur", 1): {"rsum": 500.0},
    ("blur", 2): {"rsum": 100.0},
}
REF_CLEAN = {"rsum": 540.0}
REF_CORRUPTED = {
    ("fog", 1): {"rsum": 360.0},
    ("fog", 2): {"rsum": 240.0},
    ("blur", 1): {"rsum": 480.0},
    ("blur", 2): {"rsum": 300.0},
}


def test_summary_without_reference_by_hand() -> None:
    got = corruption_summary(CLEAN, CORRUPTED)
    assert list(got) == [
        "mean_rsum/fog",
        "mean_rsum/blur",
        "mean_corrupted_rsum",
        "relative_robustness",
        "mmi",
    ]
    assert got == pytest.approx(
        {
            "mean_rsum/fog": 350.0,
            "mean_rsum/blur": 300.0,
            "mean_corrupted_rsum": 325.0,
            "relative_robustness": 0.65,
            "mmi": (0.2 + 0.4 + 0.0 + 0.8) / 4,
        }
    )


def test_summary_with_reference_by_hand() -> None:
    got = corruption_summary(CLEAN, CORRUPTED, REF_CLEAN, REF_CORRUPTED)
    # errors x600: model clean 100, fog 200 300, blur 100 500
    #              ref   clean  60, fog 240 360, blur 120 300
    ce_fog, ce_blur = 100 * 500 / 600, 100 * 600 / 420
    rel_fog, rel_blur = 100 * 300 / 480, 100 * 400 / 300
    assert got == pytest.approx(
        {
            **corruption_summary(CLEAN, CORRUPTED),
            "ce/fog": ce_fog,
            "relative_ce/fog": rel_fog,
            "ce/blur": ce_blur,
            "relative_ce/blur": rel_blur,
            "mce": (ce_fog + ce_blur) / 2,
            "relative_mce": (rel_fog + rel_blur) / 2,
        }
    )


def test_reference_equal_to_model_gives_100() -> None:
    got = corruption_summary(CLEAN, CORRUPTED, CLEAN, CORRUPTED)
    assert got["mce"] == 100.0 and got["relative_mce"] == 100.0


def test_zero_clean_rsum_gives_nan_ratios() -> None:
    got = corruption_summary({"rsum": 0.0}, {("fog", 1): {"rsum": 0.0}, ("fog", 2): {"rsum": 6.0}})
    assert got["mean_corrupted_rsum"] == 3.0
    assert math.isnan(got["relative_robustness"]) and math.isnan(got["mmi"])


def test_perfect_reference_gives_nan_ce_and_mce() -> None:
    ref = {**REF_CORRUPTED, ("fog", 1): {"rsum": 600.0}, ("fog", 2): {"rsum": 600.0}}
    got = corruption_summary(CLEAN, CORRUPTED, {"rsum": 600.0}, ref)
    assert math.isnan(got["ce/fog"]) and math.isnan(got["mce"])
    assert got["ce/blur"] == pytest.approx(100 * 600 / 420)
    assert not any(math.isinf(v) for v in got.values())


@pytest.mark.parametrize("ref_fog", [(540.0, 540.0), (550.0, 560.0)])  # not degraded / improved
def test_undegraded_reference_gives_nan_relative_ce(ref_fog: tuple[float, float]) -> None:
    ref = {**REF_CORRUPTED, ("fog", 1): {"rsum": ref_fog[0]}, ("fog", 2): {"rsum": ref_fog[1]}}
    got = corruption_summary(CLEAN, CORRUPTED, REF_CLEAN, ref)
    assert math.isnan(got["relative_ce/fog"]) and math.isnan(got["relative_mce"])
    assert math.isfinite(got["relative_ce/blur"]) and math.isfinite(got["ce/fog"])


@pytest.mark.parametrize(
    "match,args",
    [
        ("both", (CLEAN, CORRUPTED, REF_CLEAN, None)),
        ("both", (CLEAN, CORRUPTED, None, REF_CORRUPTED)),
        ("reference cells", (CLEAN, CORRUPTED, REF_CLEAN, {("fog", 1): {"rsum": 1.0}})),
        ("non-empty", (CLEAN, {})),
        ("rsum", ({"i2t_R1": 3.0}, CORRUPTED)),
        ("rsum", ({"rsum": 601.0}, CORRUPTED)),
        ("rsum", (CLEAN, {("fog", 1): {"rsum": math.nan}})),
        ("tuples", (CLEAN, {"fog": {"rsum": 1.0}})),
        ("corruption", (CLEAN, {("fog/x", 1): {"rsum": 1.0}})),
        ("severity", (CLEAN, {("fog", -1): {"rsum": 1.0}})),
    ],
)
def test_summary_invalid_input_raises(match: str, args: tuple) -> None:
    with pytest.raises(ValueError, match=match):
        corruption_summary(*args)


def test_rsum_max_for_other_ks() -> None:
    got = corruption_summary(
        {"rsum": 150.0},
        {("fog", 1): {"rsum": 100.0}},
        {"rsum": 150.0},
        {("fog", 1): {"rsum": 50.0}},
        rsum_max=200.0,
    )
    assert got["ce/fog"] == pytest.approx(100 * 0.5 / 0.75)


# ---------------------------------------------------------------- keys and flat dicts
def test_key_builders() -> None:
    assert [recall_key(d, k) for d in ("i2t", "t2i") for k in DEFAULT_KS] == DEFAULT_KEYS[:-1]
    assert clean_key("rsum") == "clean/rsum"
    assert cell_key("gaussian_noise", 3, "t2i_R5") == "corrupt/gaussian_noise/s3/t2i_R5"
    assert cell_key("fog", np.int64(2), "rsum") == "corrupt/fog/s2/rsum"
    assert per_corruption_key("mean_rsum", "fog") == "mean_rsum/fog"
    assert agg_key("mean_rsum/fog") == "agg/mean_rsum/fog" and agg_key("mce") == "agg/mce"
    assert parse_cell_key("corrupt/fog/s12/i2t_R1") == ("fog", 12, "i2t_R1")
    assert parse_cell_key("clean/rsum") is None and parse_cell_key("corrupt/fog/3/rsum") is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: clean_key("R@1"),
        lambda: clean_key(""),
        lambda: cell_key("a/b", 1, "rsum"),
        lambda: cell_key("fog", True, "rsum"),
        lambda: cell_key("fog", 1.0, "rsum"),
        lambda: agg_key("mce/"),
        lambda: per_corruption_key("ce", "bad name"),
    ],
)
def test_key_builders_reject_unsafe_names(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_flatten_and_round_trip() -> None:
    img, txt, t2i = random_dataset(1)
    clean = retrieval_recall(img, txt, t2i)
    corrupted = {
        (c, s): retrieval_recall(img + 0.3 * s * torch.randn_like(img), txt, t2i)
        for c in ("shot_noise", "fog")
        for s in (1, 2, 3)
    }
    summary = corruption_summary(clean, corrupted)
    flat = {**flatten_clean(clean), **flatten_cell_metrics(corrupted), **flatten_summary(summary)}
    assert len(flat) == len(clean) * 7 + len(summary)
    assert flat["clean/rsum"] == clean["rsum"]
    assert flat["corrupt/fog/s2/i2t_R10"] == corrupted[("fog", 2)]["i2t_R10"]
    assert flat["agg/mean_rsum/shot_noise"] == summary["mean_rsum/shot_noise"]
    assert flat["agg/mmi"] == summary["mmi"]
    assert unflatten_cell_metrics(flat) == corrupted
    corruptions, severities, rows = cell_table(flat, "rsum")
    assert (corruptions, severities) == (["shot_noise", "fog"], [1, 2, 3])
    assert rows == [[corrupted[(c, s)]["rsum"] for s in (1, 2, 3)] for c in corruptions]


def test_cell_table_missing_cells_are_nan() -> None:
    flat = {
        "corrupt/fog/s3/rsum": 1.0,
        "corrupt/blur/s1/rsum": 2.0,
        "corrupt/fog/s1/t2i_R1": 5.0,
        "clean/rsum": 9.0,
    }
    corruptions, severities, rows = cell_table(flat)
    assert (corruptions, severities) == (["fog", "blur"], [1, 3])
    assert math.isnan(rows[0][0]) and rows[0][1] == 1.0 and rows[1][0] == 2.0
    assert math.isnan(rows[1][1])
    with pytest.raises(ValueError, match="i2t_R1"):
        cell_table(flat, "i2t_R1")
