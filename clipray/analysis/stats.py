"""Paired bootstrap of a sweep's arms against its baseline, over seeds and evaluation queries.

Inputs are per-query ranks (0-based rank of the best-ranked correct match), so every number here
is the RSUM of :mod:`clipray.core.metrics` on the same queries:
    Recall@K = 100 * mean(rank < K);  RSUM = sum over i2t, t2i and K in (1, 5, 10) of Recall@K.
A query's *score* is how many of the K it hits (0-3), so RSUM = 100 * (mean i2t score + mean
t2i score). RSUM is linear in the scores: an endpoint over several cells (the mean corrupted RSUM,
a corruption family) is the RSUM of the cell-averaged scores, and one matrix product per batch
of resamples gives every arm, seed and endpoint at once.

The bootstrap (a crossed design: training seeds x evaluation queries)
    Each resample draws seeds with replacement (one draw for every arm: seed k of an arm pairs
    with seed k of the baseline) and images with replacement (one draw for every arm, seed and
    cell; a caption goes with its image when the ranks say whose it is, else captions are drawn
    on their own). An arm's effect is the mean over the drawn seeds of (arm - baseline) RSUM,
    both on the drawn queries; its level is the mean over the drawn seeds of its RSUM.
    Interval: the 2.5 and 97.5 percentiles of the resampled values (percentile bootstrap).
    p-value, two-sided: twice the smaller share of resampled effects at or beyond 0 (+1
    correction); below alpha exactly when the (1 - alpha) interval excludes 0.
    Holm's step-down correction across the compared arms, per endpoint: an effect is
    *distinguishable from the baseline* when its Holm-adjusted p-value is below alpha.
With one seed an interval covers evaluation-query noise only, not training randomness; with few
seeds (3) the seed part of the bootstrap is coarse and tends to be narrow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipray.core.metrics import DEFAULT_KS

ALPHA = 0.05  # two-sided: 95 % intervals
RESAMPLES = 2000  # 95 % percentile intervals are stable to ~0.1 RSUM from ~2000 resamples
CHUNK = 100  # resamples per matrix product: memory O(CHUNK x queries), speed from BLAS


def query_scores(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> np.ndarray:
    """Per query: how many of ``ks`` its rank is inside (rank < K); float32."""
    ranks = np.asarray(ranks)
    return (ranks[..., None] < np.asarray(ks)).sum(-1).astype(np.float32)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Recall@K in percent: the share of queries whose correct match ranks below K."""
    return 100.0 * float(np.mean(np.asarray(ranks) < k))


def rsum_from_ranks(i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> float:
    """RSUM (0-600 for ks 1, 5, 10) of one cell from its two directions' ranks."""
    return sum(recall_at(r, k) for r in (i2t, t2i) for k in ks)


@dataclass(frozen=True)
class Design:
    """Per-query scores of every (arm, seed, endpoint): what the bootstrap resamples."""

    arms: tuple[str, ...]  # with a baseline, arms[0] is it
    seeds: tuple[int, ...]
    endpoints: tuple[str, ...]  # e.g. clean, corrupted, noise, ...
    i2t: np.ndarray  # (arms, seeds, endpoints, images): query score averaged over the cells
    t2i: np.ndarray  # (arms, seeds, endpoints, captions)
    present: np.ndarray  # (arms, seeds) bool: that trial was scored (absent: zeros above)
    text_to_image: np.ndarray | None = None  # (captions,) image of each caption, when known

    def rsum(self) -> np.ndarray:
        """(arms, seeds, endpoints) RSUM on all queries; NaN where no trial."""
        out = 100.0 * (self.i2t.mean(-1, dtype=np.float64) + self.t2i.mean(-1, dtype=np.float64))
        return np.where(self.present[..., None], out, np.nan)


@dataclass(frozen=True)
class Effects:
    """Each arm's RSUM per endpoint, and its change against the baseline, with 95 % intervals.

    Arrays are (arms, endpoints); rows and columns as in the :class:`Design`. Change, interval and
    p-values are NaN for the baseline row and everywhere when there is no baseline."""

    arms: tuple[str, ...]
    endpoints: tuple[str, ...]
    level: np.ndarray  # mean over the arm's seeds
    level_low: np.ndarray
    level_high: np.ndarray
    change: np.ndarray  # mean over paired seeds of (arm - baseline)
    low: np.ndarray
    high: np.ndarray
    p: np.ndarray
    p_holm: np.ndarray
    distinguishable: np.ndarray  # bool: Holm-adjusted p < alpha
    seeds: np.ndarray  # (arms,) how many seeds the arm was trained with
    paired_seeds: np.ndarray  # (arms,) of them, shared with the baseline
    resamples: int
    alpha: float


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests; NaN entries are not tests."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    tests = np.flatnonzero(~np.isnan(p))
    order = tests[np.argsort(p[tests], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def two_sided_p(draws: np.ndarray) -> np.ndarray:
    """Bootstrap p-value of "no change" from resampled effects (last axis); NaN ignored."""
    valid = ~np.isnan(draws)
    n = valid.sum(-1)
    below = ((draws <= 0) & valid).sum(-1)
    above = ((draws >= 0) & valid).sum(-1)
    p = np.minimum(1.0, 2.0 * (np.minimum(below, above) + 1) / (n + 1))
    return np.where(n > 0, p, np.nan)


def _counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) float32: how often each of n units is drawn in each of b resamples of size n."""
    draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)


def _resampled_rsum(design: Design, rng: np.random.Generator, b: int) -> np.ndarray:
    """(arms, seeds, endpoints, b) RSUM on b resamples of the queries, shared by all rows."""
    shape = design.i2t.shape[:3]
    images = _counts(rng, b, design.i2t.shape[-1])
    if design.text_to_image is not None:
        captions = images[:, design.text_to_image]  # a caption is drawn as often as its image
    else:
        captions = _counts(rng, b, design.t2i.shape[-1])
    out = 0.0
    for scores, w in ((design.i2t, images), (design.t2i, captions)):
        total = scores.reshape(-1, scores.shape[-1]) @ w.T  # (rows, b)
        out = out + total / w.sum(1)
    return (100.0 * out).reshape(*shape, b)


def _seed_mean(rsum: np.ndarray, seed_weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(arms, endpoints, b): weighted mean over seeds of (arms, seeds, endpoints, b) values,
    weights (b, seeds) times mask (arms, seeds); NaN where an arm has no weight."""
    w = mask[:, :, None] * seed_weights.T[None]  # (arms, seeds, b)
    total = np.einsum("aseb,asb->aeb", np.nan_to_num(rsum), w)
    weight = w.sum(1)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def bootstrap(
    design: Design,
    has_baseline: bool,
    resamples: int = RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> Effects:
    """Levels and changes against the baseline (``arms[0]`` when ``has_baseline``) per arm and
    endpoint, with percentile intervals, p-values and Holm's correction; reproducible by seed."""
    rng = np.random.default_rng(seed)
    n_seeds = len(design.seeds)
    pairs = design.present & design.present[:1] & has_baseline  # seed k with seed k
    pairs[0] = False  # the baseline is not compared with itself
    rsum = design.rsum()[..., None]
    ones = np.ones((1, n_seeds))
    level = _seed_mean(rsum, ones, design.present)[..., 0]
    change = _seed_mean(rsum - rsum[:1], ones, pairs)[..., 0]
    levels, changes = [], []
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        r = _resampled_rsum(design, rng, b)
        v = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b).astype(float)
        levels.append(_seed_mean(r, v, design.present))
        changes.append(_seed_mean(r - r[:1], v, pairs))
    levels, changes = np.concatenate(levels, -1), np.concatenate(changes, -1)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: the baseline's change
        level_low, level_high = np.nanpercentile(levels, q, axis=-1)
        low, high = np.nanpercentile(changes, q, axis=-1)
    p = two_sided_p(changes)
    p_holm = np.stack([holm(column) for column in p.T], axis=1) if p.size else p
    return Effects(
        design.arms,
        design.endpoints,
        level,
        level_low,
        level_high,
        change,
        low,
        high,
        p,
        p_holm,
        np.nan_to_num(p_holm, nan=1.0) < alpha,
        design.present.sum(1),
        pairs.sum(1),
        resamples,
        alpha,
    )


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats in both x and y (higher is better), by x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    front = [
        i
        for i in ok
        if not any((x[j] >= x[i]) & (y[j] >= y[i]) & ((x[j] > x[i]) | (y[j] > y[i])) for j in ok)
    ]
    return sorted(front, key=lambda i: x[i])
