"""Paired bootstrap of a sweep's arms against its baseline, over seeds and evaluation queries.

Inputs are per-query ranks (0-based rank of the best-ranked correct match), so every number here
is the RSUM of :mod:`clipray.core.metrics` on the same queries:
    Recall@K = 100 * mean(rank < K);  RSUM = sum over i2t, t2i and K in (1, 5, 10) of Recall@K.
A query's *score* is how many of the K it hits (0-3), so RSUM = 100 * (mean i2t score + mean
t2i score). RSUM is linear in the scores: an endpoint over several cells (the mean corrupted RSUM,
a corruption family) is the RSUM of the cell-averaged scores, and one matrix product per batch
of resamples gives every arm, seed and endpoint at once.

Uncertainty (a crossed design: training seeds x evaluation queries)
    Query part, a paired bootstrap: each resample draws images with replacement, one draw for
    every arm, seed and cell (a caption goes with its image when the sweep says whose it is, else
    captions are drawn on their own); its spread is the evaluation set's sampling error of a
    level or of a change (arm - baseline on the same queries), seeds held fixed.
    Seed part: seed k of an arm pairs with seed k of the baseline; the spread of the per-seed
    changes over the n paired seeds is the training randomness. A percentile bootstrap over 3
    seeds would be far too narrow (it calls an effect real whenever all 3 differences share a
    sign: a quarter of the time under no effect), so the two parts are combined as
    SE^2 = s_seeds^2 / n + SE_queries^2 with Student's t on n - 1 degrees of freedom (the normal
    with one seed, when the interval covers query noise only).
    Interval: estimate +- t * SE; p-value, two-sided, from t = estimate / SE; NaN where SE is 0
    (nothing to resample: one seed and no ranks).
    Holm's step-down correction across the compared arms, per endpoint: an effect is
    *distinguishable from the baseline* when its Holm-adjusted p-value is below alpha.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

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


def _query_se(design: Design, pairs: np.ndarray, rng, resamples: int) -> tuple:
    """Standard errors over query resamples, seeds fixed: (levels, changes), (arms, endpoints)."""
    levels, changes = [], []
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        r = _resampled_rsum(design, rng, b)
        ones = np.ones((b, len(design.seeds)))
        levels.append(_seed_mean(r, ones, design.present))
        changes.append(_seed_mean(r - r[:1], ones, pairs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: the baseline's change
        return tuple(np.nanstd(np.concatenate(x, -1), -1, ddof=1) for x in (levels, changes))


def _seed_spread(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(arms, endpoints) mean, variance of the mean over the masked seeds (0 with one seed)."""
    n = mask.sum(1)[:, None]
    v = np.where(mask[..., None], values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(v, 1)
        var = np.where(n > 1, np.nanvar(v, 1, ddof=1), 0.0) / np.maximum(n, 1)
    return mean, var


def _interval(estimate, seed_var, query_se, n, alpha):
    """(low, high, p) from the combined standard error and Student's t on n - 1 df."""
    se = np.sqrt(seed_var + np.nan_to_num(query_se) ** 2)
    df = np.broadcast_to(np.where(n > 1, n - 1, np.inf)[:, None], se.shape)
    t_crit = scipy_stats.t.ppf(1 - alpha / 2, df)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(se > 0, 2 * scipy_stats.t.sf(np.abs(estimate) / se, df), np.nan)
    # SE 0: identical to the baseline on every query and seed (p 1), or nothing to resample
    p = np.where((se == 0) & (estimate == 0), 1.0, p)
    half = np.where(se > 0, t_crit * se, 0.0)
    return estimate - half, estimate + half, np.where(np.isfinite(estimate), p, np.nan)


def bootstrap(
    design: Design,
    has_baseline: bool,
    resamples: int = RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> Effects:
    """Levels and changes against the baseline (``arms[0]`` when ``has_baseline``) per arm and
    endpoint, with intervals, p-values and Holm's correction (module docstring); reproducible."""
    rng = np.random.default_rng(seed)
    pairs = design.present & design.present[:1] & has_baseline  # seed k with seed k
    pairs[0] = False  # the baseline is not compared with itself
    rsum = design.rsum()  # (arms, seeds, endpoints)
    level_q, change_q = _query_se(design, pairs, rng, resamples)
    level, level_var = _seed_spread(rsum, design.present)
    change, change_var = _seed_spread(rsum - rsum[:1], pairs)
    level_low, level_high, _ = _interval(level, level_var, level_q, design.present.sum(1), alpha)
    low, high, p = _interval(change, change_var, change_q, pairs.sum(1), alpha)
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
