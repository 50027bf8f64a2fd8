"""A sweep's trials as the report reads them: results rows, arms, seeds and per-query ranks.

The inputs (written by the sweep; :mod:`clipray.sweep.report` reads them from a sweep directory
or from MLflow):
    results rows    one per trial: trial_id, trial, status, arm, seed, the searched config paths
                    and the metrics (clean/rsum, agg/..., corrupt/<c>/s<k>/rsum)
    ranks           per trial, {cell/direction: int array}: for each query (an image for i2t, a
                    caption for t2i) the 0-based rank of its best-ranked correct match; cells are
                    ``clean`` and ``corrupt/<corruption>/s<severity>``; optional
                    ``text_to_image`` (each caption's image) lets a caption follow its image in
                    the bootstrap. Query order is the same in every trial of a sweep.
An *arm* is a configuration without its seed ("baseline" for epsilon = 0); seed k of every arm
shares initialisation and data order, so arms pair by seed.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipray.analysis.stats import Design, query_scores, rsum_from_ranks
from clipray.config.corruption_names import FAMILIES
from clipray.scoring.plan import OWNERS

BASELINE_ARM = "baseline"
SEED = "seed"  # the results column (and MLflow param) of a trial's training seed
EPSILON = "perturb.epsilon"
BASELINE_PARAM = "clipray.baseline"  # set in the baseline trial's config
CLEAN, CORRUPTED = "clean", "corrupted"
LABELS = {CLEAN: "clean RSUM", CORRUPTED: "mean corrupted RSUM"}
DIRS = ("i2t", "t2i")  # image->text, text->image
RSUM_TOLERANCE = 1e-3  # ranks and a logged rsum agree to float32 rounding


def arm_label(params: Mapping[str, Any], digits: int = 12) -> str:
    """The configuration without its seed, what paired seeds of one arm share: ``baseline`` (the
    sweep's baseline trial, or epsilon = 0), else the searched values by their last name, sorted:
    ``epsilon=0.003, kind=noise, layer=2, tower=image``. The identity (the ``clipray.arm`` tag a
    trial writes, and the fallback for runs without it) keeps 12 significant digits, so two
    sampled epsilons never merge; run names show 3."""
    skip = (SEED, BASELINE_PARAM)
    values = {k: v for k, v in params.items() if k not in skip and v not in ("", None)}
    epsilon = values.get(EPSILON)
    if params.get(BASELINE_PARAM) or (epsilon is not None and _number(epsilon) == 0.0):
        return BASELINE_ARM
    return ", ".join(f"{k.split('.')[-1]}={_fmt(v, digits)}" for k, v in sorted(values.items()))


def _fmt(v: Any, digits: int) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_value(text: str) -> Any:
    """A CSV cell as int, float or text; empty is None."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results_csv(text: str) -> list[dict[str, Any]]:
    """results.csv as rows of typed values (trial ids and names stay text)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    keep = {"trial_id", "trial", "status", "arm"}
    return [{k: v if k in keep else parse_value(v) for k, v in row.items()} for row in rows]


def read_ranks(data: bytes) -> dict[str, np.ndarray]:
    """A ``query_ranks.npz`` (numpy savez) as {key: array}."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass(frozen=True)
class Trial:
    """One finished trial as the statistics see it."""

    trial_id: str
    arm: str
    seed: int
    params: dict[str, Any]  # the searched values, without the seed
    metrics: dict[str, float]
    ranks: dict[str, np.ndarray] | None  # None: no per-query ranks were found for it


def finished(row: Mapping[str, Any]) -> bool:
    """Scored to the end: FINISHED with a clean RSUM (early-stopped trials have none)."""
    value = _number(row.get("clean/rsum"))
    return row.get("status") == "FINISHED" and value is not None and math.isfinite(value)


def to_trial(
    row: Mapping[str, Any], searched: Sequence[str], ranks: dict[str, np.ndarray] | None
) -> Trial:
    """A results row (and its ranks) as a :class:`Trial`; a row without a seed is seed 0."""
    params = {k: row.get(k) for k in searched if k != SEED}
    metrics = {k: float(v) for k, v in row.items() if "/" in k and _number(v) is not None}
    seed = row.get(SEED)
    return Trial(
        str(row["trial_id"]),
        row.get("arm") or arm_label(params),
        int(seed) if _number(seed) is not None else 0,
        params,
        metrics,
        ranks,
    )


def _endpoints(cells: Sequence[str]) -> dict[str, list[str]]:
    """{endpoint: its cells}: clean, corrupted (every corrupted cell: agg/mean_corrupted_rsum),
    then each family (FAMILIES) with at least one cell."""
    corrupted = [c for c in cells if c.startswith("corrupt/")]
    out = {CLEAN: [c for c in cells if c == CLEAN], CORRUPTED: corrupted}
    for family, names in FAMILIES.items():
        out[family] = [c for c in corrupted if c.split("/")[1] in names]
    return {k: v for k, v in out.items() if v}


def _metric_cells(trial: Trial) -> dict[str, float]:
    """{cell: rsum} from a trial's logged metrics."""
    out = {CLEAN: trial.metrics.get("clean/rsum", math.nan)}
    for key, value in trial.metrics.items():
        if key.startswith("corrupt/") and key.endswith("/rsum"):
            out[key.removesuffix("/rsum")] = value
    return out


def _cells(trial: Trial) -> list[str]:
    keys = trial.ranks or {}
    return [k[:-4] for k in keys if k.endswith("/i2t") and f"{k[:-4]}/t2i" in keys]


def _order(trials: Sequence[Trial]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Arms (the baseline first, then by their searched values, epsilon last) and seeds."""
    arms = {t.arm: t.params for t in trials}

    def key(arm: str) -> tuple:
        values = arms[arm]
        names = sorted(values, key=lambda k: (k == EPSILON, k))  # epsilon last: lines together
        return (arm != BASELINE_ARM, *((k, str(type(values[k])), values[k]) for k in names))

    try:
        ordered = sorted(arms, key=key)
    except TypeError:  # values of mixed types under one key
        ordered = sorted(arms, key=lambda a: (a != BASELINE_ARM, a))
    return tuple(ordered), tuple(sorted({t.seed for t in trials}))


def unique(trials: Sequence[Trial], notes: list[str]) -> list[Trial]:
    """One trial per (arm, seed): the first; the others are named in a note."""
    seen: dict[tuple[str, int], str] = {}
    out = []
    for t in trials:
        if (t.arm, t.seed) in seen:
            notes.append(
                f"trial {t.trial_id} repeats {t.arm} seed {t.seed} (kept {seen[t.arm, t.seed]})"
            )
            continue
        seen[t.arm, t.seed] = t.trial_id
        out.append(t)
    return out


def _same_queries(trials: Sequence[Trial], notes: list[str]) -> tuple[list[Trial], list[str]]:
    """Trials whose ranks cover the same cells and query counts as the first; the cells."""
    first = trials[0].ranks
    sizes = {d: len(first[f"{CLEAN}/{d}"]) if f"{CLEAN}/{d}" in first else None for d in DIRS}
    kept = []
    for t in trials:
        if any(
            n is not None and len(t.ranks.get(f"{CLEAN}/{d}", ())) != n for d, n in sizes.items()
        ):
            notes.append(f"trial {t.trial_id}: its ranks are of another evaluation set; left out")
        else:
            kept.append(t)
    cells = [c for c in _cells(kept[0]) if all(c in _cells(t) for t in kept)]
    if any(set(_cells(t)) != set(cells) for t in kept):
        notes.append(
            f"trials were scored on different cells; compared on the {len(cells)} all have"
        )
    return kept, cells


def _check_against_metrics(t: Trial, cells: Sequence[str], notes: list[str]) -> None:
    """A note when a trial's ranks do not give the RSUM it logged (a mixed-up ranks file)."""
    logged = _metric_cells(t)
    for cell in cells:
        value = rsum_from_ranks(t.ranks[f"{cell}/i2t"], t.ranks[f"{cell}/t2i"])
        if cell in logged and not abs(value - logged[cell]) <= RSUM_TOLERANCE * max(1, value):
            notes.append(
                f"trial {t.trial_id}: its ranks give {cell} RSUM {value:.2f}, "
                f"its metrics {logged[cell]:.2f}"
            )
            return


def design_from_ranks(trials: Sequence[Trial], notes: list[str]) -> Design | None:
    """The bootstrap's input from per-query ranks; None when no trial has them."""
    with_ranks = [t for t in trials if t.ranks]
    missing = [t.trial_id for t in trials if not t.ranks]
    if missing and with_ranks:
        notes.append(
            f"{len(missing)} finished trial(s) have no per-query ranks and are left out: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )
    if not with_ranks:
        return None
    kept, cells = _same_queries(with_ranks, notes)
    arms, seeds = _order(kept)
    endpoints = _endpoints(cells)
    first = kept[0].ranks
    shape = (len(arms), len(seeds), len(endpoints))
    arrays = {d: np.zeros((*shape, len(first[f"{cells[0]}/{d}"])), np.float32) for d in DIRS}
    present = np.zeros(shape[:2], bool)
    for t in kept:
        _check_against_metrics(t, cells, notes)
        a, s = arms.index(t.arm), seeds.index(t.seed)
        present[a, s] = True
        for d in DIRS:
            scores = {c: query_scores(t.ranks[f"{c}/{d}"]) for c in cells}
            for e, members in enumerate(endpoints.values()):
                arrays[d][a, s, e] = np.mean([scores[c] for c in members], axis=0)
    owners = first.get(OWNERS)
    if owners is not None and len(owners) != arrays["t2i"].shape[-1]:
        owners = None
    return Design(arms, seeds, tuple(endpoints), arrays["i2t"], arrays["t2i"], present, owners)


def design_from_metrics(trials: Sequence[Trial]) -> Design:
    """The bootstrap's input from logged RSUMs alone (no ranks): one "query" per trial whose
    score is the RSUM, so resampling leaves it be and only seeds are resampled."""
    arms, seeds = _order(trials)
    by_trial = {t.trial_id: _metric_cells(t) for t in trials}
    cells = [c for c in by_trial[trials[0].trial_id] if all(c in m for m in by_trial.values())]
    endpoints = _endpoints(cells)
    values = np.zeros((len(arms), len(seeds), len(endpoints), 1), np.float32)
    present = np.zeros(values.shape[:2], bool)
    for t in trials:
        a, s = arms.index(t.arm), seeds.index(t.seed)
        present[a, s] = True
        for e, members in enumerate(endpoints.values()):
            values[a, s, e, 0] = np.mean([by_trial[t.trial_id][c] for c in members]) / 200.0
    return Design(arms, seeds, tuple(endpoints), values, values, present)
