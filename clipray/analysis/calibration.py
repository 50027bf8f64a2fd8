"""Calibration: per tower, layer and kind, what a perturbation of radius epsilon costs clean
retrieval and how much it raises the training loss, so a search range can be set from it.

    clean cost   the arm's clean RSUM change against the baseline (the report's paired bootstrap:
                 mean over paired seeds, 95 % interval), also in % of the baseline's mean clean
                 RSUM over its seeds; cost % = -change %
    loss gap     train/adv_loss - train/clean_loss of the final epoch (each the epoch's mean over
                 its steps, logged with the trial's scores; with train.checkpoint_every_steps,
                 the steps since the last checkpoint), mean over the arm's seeds
    0-15 % range on each line of arms along epsilon: from the smallest measured epsilon (a
                 score above the baseline is no measurable cost, within "about 0 %") to where
                 the clean cost first reaches ``TOP`` %, interpolated linearly on log epsilon
                 between measured points
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clipray.analysis import document as doc
from clipray.analysis.plots import KIND, Curve, calibration_curves
from clipray.analysis.results import BASELINE_ARM, CLEAN, EPSILON, Trial
from clipray.analysis.stats import Effects

CLEAN_LOSS, ADV_LOSS = "train/clean_loss", "train/adv_loss"  # final-epoch means, per trial
LOSSES = (CLEAN_LOSS, ADV_LOSS)
TOWER, LAYER = "perturb.tower", "perturb.layer"
TOP = 15.0  # % of the baseline's clean RSUM: the most a calibrated search range should cost
FIGURE = "calibration.png"
CAPTION = (
    f"Left: clean RSUM cost in % of the baseline's against epsilon (dotted: 0 and {TOP:g} %); "
    "right: the loss increase the perturbation achieves (final epoch); dashed: noise control"
)
NO_LOSSES = (
    f"no perturbation loss columns ({CLEAN_LOSS}, {ADV_LOSS}) in the results: a sweep from before "
    "they were recorded; the calibration shows the clean cost only"
)


@dataclass(frozen=True)
class CalibrationRow:
    """One perturbed arm: where it perturbs, and what that costs and achieves."""

    tower: str
    layer: str
    kind: str
    other: str  # the other searched values (e.g. steps=3), "" when none
    epsilon: float
    change: float  # clean RSUM, arm - baseline (NaN: no paired baseline)
    low: float
    high: float
    change_pct: float  # change in % of the baseline's clean RSUM
    gap: float  # mean over seeds of train/adv_loss - train/clean_loss (NaN: not recorded)

    @property
    def line(self) -> tuple[str, str, str, str]:
        return self.tower, self.layer, self.kind, self.other


def _value(params: Mapping[str, object], fixed: Mapping[str, object], key: str) -> str:
    value = params.get(key, fixed.get(key))
    return "-" if value in (None, "") else str(value)


def _gap(trials: Sequence[Trial]) -> float:
    gaps = [t.metrics.get(ADV_LOSS, math.nan) - t.metrics.get(CLEAN_LOSS, math.nan) for t in trials]
    gaps = [g for g in gaps if math.isfinite(g)]
    return float(np.mean(gaps)) if gaps else math.nan


def calibration_rows(
    effects: Effects, trials: Sequence[Trial], fixed: Mapping[str, object] | None = None
) -> list[CalibrationRow]:
    """A row per perturbed arm of the report (epsilon > 0), by line and epsilon; ``fixed``: the
    sweep's values of what it did not search (``perturb.tower`` ...), to name every line."""
    fixed = fixed or {}
    base = effects.arms.index(BASELINE_ARM) if BASELINE_ARM in effects.arms else None
    c = effects.endpoints.index(CLEAN) if CLEAN in effects.endpoints else None
    reference = effects.level[base, c] if base is not None and c is not None else math.nan
    named = (TOWER, LAYER, KIND, EPSILON)
    out = []
    for a, arm in enumerate(effects.arms):
        mine = [t for t in trials if t.arm == arm]
        params = mine[0].params if mine else {}
        epsilon = params.get(EPSILON)
        if a == base or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            continue
        change, low, high = (
            (x[a, c] for x in (effects.change, effects.low, effects.high))
            if c is not None
            else (math.nan,) * 3
        )
        other = ", ".join(
            f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()) if k not in named
        )
        where = (_value(params, fixed, k) for k in (TOWER, LAYER, KIND))
        pct = 100.0 * change / reference if reference else math.nan
        gap = _gap(mine)
        out.append(CalibrationRow(*where, other, float(epsilon), change, low, high, pct, gap))
    return sorted(out, key=lambda r: (r.line, r.epsilon))


def _crossing(x0: float, y0: float, x1: float, y1: float, level: float) -> float:
    """Epsilon where the line from (log x0, y0) to (log x1, y1) reaches ``level``."""
    t = (level - y0) / (y1 - y0)
    return float(10 ** (math.log10(x0) + t * (math.log10(x1) - math.log10(x0))))


@dataclass(frozen=True)
class CostRange:
    """The epsilon range of one line where its clean cost is about 0-``TOP`` %: from the
    smallest measured epsilon (a score above the baseline is no measurable cost: one seed's
    noise, not a gain, so it starts the range rather than cutting it) to where the cost first
    reaches ``TOP`` %."""

    low: float | None  # the smallest measured epsilon; None: above TOP % already there
    high: float | None  # where the cost first reaches TOP %; None: not reached


def cost_range(epsilon: Sequence[float], cost: Sequence[float], top: float = TOP) -> CostRange:
    """The range on a line of (epsilon, cost %) points, epsilon ascending, the crossing of
    ``top`` interpolated on log epsilon."""
    x, y = list(epsilon), list(cost)
    above = next((i for i, v in enumerate(y) if v >= top), None)
    if above == 0:
        return CostRange(None, x[0])
    if above is None:
        return CostRange(x[0], None)
    return CostRange(x[0], _crossing(x[above - 1], y[above - 1], x[above], y[above], top))


def _clause(rows: Sequence[CalibrationRow]) -> str:
    """What one line says of its 0-TOP % range."""
    eps = [r.epsilon for r in rows]
    cost = [0.0 - r.change_pct for r in rows]  # 0.0 -: no "-0.0"
    name = ", ".join(p for p in (rows[0].kind, rows[0].other) if p)
    if any(not math.isfinite(v) for v in cost):
        return f"{name}: no clean cost (no paired baseline)"
    found = cost_range(eps, cost)
    g = "{:.3g}".format
    if found.low is None:
        return (
            f"{name}: above {TOP:g} % already at the smallest measured epsilon {g(eps[0])} "
            f"({cost[0]:.1f} %); the range lies below it"
        )
    end = math.inf if found.high is None else found.high
    gains = [g(e) for e, c in zip(eps, cost, strict=True) if c < 0 and e < end]
    note = f" (above the baseline, no measurable cost, at {', '.join(gains)})" if gains else ""
    if len(eps) == 1 and found.high is None:
        return f"{name}: 0-{TOP:g} % at epsilon {g(eps[0])}, the only one measured{note}"
    if found.high is None:
        return (
            f"{name}: 0-{TOP:g} % from epsilon {g(eps[0])} (the smallest measured) to at least "
            f"{g(eps[-1])} (the largest measured, {cost[-1]:.1f} %){note}; {TOP:g} % not reached"
        )
    return (
        f"{name}: 0-{TOP:g} % for epsilon {g(eps[0])} (the smallest measured) to "
        f"{g(found.high)}{note}"
    )


def range_sentences(rows: Sequence[CalibrationRow]) -> list[str]:
    """One sentence per tower and layer: each of its lines' 0-TOP % range of epsilon."""
    places: dict[tuple[str, str], dict[tuple, list[CalibrationRow]]] = {}
    for r in rows:
        places.setdefault((r.tower, r.layer), {}).setdefault(r.line, []).append(r)
    return [
        f"Tower {tower}, layer {layer}: "
        + "; ".join(_clause(line) for line in lines.values())
        + "."
        for (tower, layer), lines in places.items()
    ]


def _signed(value: float, digits: str = ".1f") -> str:
    return "-" if not math.isfinite(value) else format(value, "+" + digits)


def calibration_table(rows: Sequence[CalibrationRow]) -> doc.Block:
    """tower, layer, kind, (other searched values), epsilon, clean RSUM change [95 % CI],
    change in %, loss gap: the numbers of :class:`CalibrationRow`, rounded for reading."""
    others = any(r.other for r in rows)
    header = ["tower", "layer", "kind", *(["other"] * others), "epsilon"]
    header += ["clean RSUM Δ [95 % CI]", "Δ %", "loss gap (adv - clean)"]
    table = []
    for r in rows:
        cells = [r.tower, r.layer, r.kind, *([r.other or "-"] * others), f"{r.epsilon:.3g}"]
        cells += [doc.interval(r.change, r.low, r.high, signed=True), _signed(r.change_pct)]
        table.append([*cells, _signed(r.gap, "#.3g")])  # 3 digits, zeros kept
    return doc.table(header, table)


def _curves(rows: Sequence[CalibrationRow]) -> list[Curve]:
    lines: dict[tuple, list[CalibrationRow]] = {}
    for r in rows:
        lines.setdefault(r.line, []).append(r)
    return [
        Curve(
            ", ".join(p for p in (f"{r[0].tower} L{r[0].layer}", r[0].kind, r[0].other) if p),
            tuple(x.epsilon for x in r),
            tuple(-x.change_pct for x in r),
            tuple(x.gap for x in r),
            noise=r[0].kind == "noise",
            colour_key=f"{r[0].tower} {r[0].layer} {r[0].other}",  # pgd and its control alike
        )
        for r in lines.values()
    ]


def calibration_section(
    effects: Effects, trials: Sequence[Trial], fixed: Mapping[str, object], notes: list[str]
) -> tuple[list[doc.Block], dict[str, bytes]]:
    """The report's Calibration section and its figure; nothing when no arm is perturbed.
    Adds :data:`NO_LOSSES` to ``notes`` when no trial recorded its losses (an older sweep)."""
    rows = calibration_rows(effects, trials, fixed)
    if not rows:
        return [], {}
    if all(math.isnan(r.gap) for r in rows):
        notes.append(NO_LOSSES)
    blocks = [
        doc.heading("Calibration"),
        doc.text(
            "Per tower, layer and kind: the clean RSUM change against the baseline (mean over "
            "paired seeds, 95 % interval as above), the same in % of the baseline's mean clean "
            "RSUM, and the loss increase the perturbation achieves (train/adv_loss - "
            "train/clean_loss over the final epoch, mean over seeds). The epsilon range where "
            f"the clean cost is about 0-{TOP:g} %: from the smallest measured epsilon (a score "
            "above the baseline is no measurable cost) to where the cost reaches "
            f"{TOP:g} %, interpolated on log epsilon between measured points:"
        ),
        doc.bullets(range_sentences(rows)),
        calibration_table(rows),
    ]
    png = calibration_curves(_curves(rows), TOP)
    images = {FIGURE: png} if png is not None else {}
    if images:
        blocks.append(doc.image(FIGURE, CAPTION))
    return blocks, images
