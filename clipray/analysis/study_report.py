"""The report of a finished sweep: which configurations change clean and corrupted retrieval
against the baseline, by how much, and how sure that is (inputs in, files out; no I/O here).

Whatever is missing (no finished trial, no baseline, one seed, no per-query ranks) is said in one
line at the top, and the report still shows what it can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipray.analysis import document as doc
from clipray.analysis import plots
from clipray.analysis.calibration import calibration_section
from clipray.analysis.contrast import contrast_section
from clipray.analysis.importance import param_importances
from clipray.analysis.results import (
    BASELINE_ARM,
    CLEAN,
    CORRUPTED,
    LABELS,
    SEED,
    Trial,
    design_from_metrics,
    design_from_ranks,
    finished,
    to_trial,
    unique,
)
from clipray.analysis.stats import RESAMPLES, Design, Effects, bootstrap

NO_TRIAL = (
    "no finished trial: nothing to compare yet; the table below lists every trial and its status"
)
NO_BASELINE = (
    "no finished baseline (epsilon = 0): each arm's RSUM is shown with its interval, but no "
    "change against the baseline, p-value or verdict"
)
ONE_SEED = (
    "one seed per arm: intervals cover the evaluation queries only, not training randomness "
    "(run every arm with several seeds to include it)"
)
NO_RANKS = "no per-query ranks: intervals resample seeds only, not evaluation queries"
NO_INTERVALS = "one seed and no per-query ranks: the numbers have no intervals"
FIGURES = {  # file name: caption
    "rsum_vs_epsilon.png": "Clean and mean corrupted RSUM against epsilon (dashed: noise "
    "control), 95 % bootstrap bands; grey: the baseline and its interval",
    "change_heatmap.png": "Change against the baseline per corruption family; extra = the "
    "held-out confirmation set; * distinguishable after Holm's correction",
    "pareto.png": "Clean against mean corrupted RSUM per arm (mean over seeds, 95 % intervals); "
    "red: the Pareto front",
    "importances.png": "Parameter importances (Optuna's fANOVA evaluator)",
}


@dataclass(frozen=True)
class SweepInputs:
    """What a report is made of, however it was read (a sweep directory or MLflow)."""

    sweep_id: str
    source: str  # where the trials were read, for the reader
    rows: Sequence[Mapping[str, Any]]  # every trial: the results.csv rows
    ranks: Mapping[str, Mapping[str, np.ndarray]]  # trial id -> its per-query ranks, if found
    space: Mapping[str, Mapping[str, Any]]  # the search space (clipray.config.space as dicts)
    metric: str = "agg/mean_corrupted_rsum"  # the sweep's objective
    mode: str = "max"
    notes: tuple[str, ...] = ()  # what reading them found amiss, one line each
    fixed: Mapping[str, Any] = field(default_factory=dict)  # unsearched values: perturb.tower...


@dataclass(frozen=True)
class Report:
    """The report's text, its figures, and the lines that say what it could not show."""

    markdown: str
    html: str
    images: dict[str, bytes]
    notes: list[str]
    effects: Effects | None
    trials: list[Trial] = field(default_factory=list)

    def files(self) -> dict[str, str | bytes]:
        """{file name: content} of the report directory."""
        return {"report.md": self.markdown, "report.html": self.html, **self.images}


def build_report(inputs: SweepInputs, resamples: int = RESAMPLES, seed: int = 0) -> Report:
    """Statistics, figures and both renderings of a sweep's report."""
    notes = list(inputs.notes)
    searched = [k for k in inputs.space if k != SEED]
    done = [r for r in inputs.rows if finished(r)]
    trials = unique([to_trial(r, searched, _ranks(inputs, r)) for r in done], notes)
    effects, design = None, None
    if trials:
        design, effects = _statistics(trials, notes, resamples, seed)
    else:
        notes.append(NO_TRIAL)
    importances: dict[str, dict[str, float]] = {}
    if trials:
        importances = _importances(trials, inputs, notes)
    images = _figures(effects, trials, importances)
    calibration: list[doc.Block] = []
    if effects is not None:
        calibration, figure = calibration_section(effects, trials, inputs.fixed, notes)
        images.update(figure)
    blocks = [
        doc.heading(f"Sweep {inputs.sweep_id}", 1),
        doc.text(_overview(inputs, trials, design, resamples)),
    ]
    if notes:
        blocks += [doc.heading("What this report can show"), doc.bullets(notes)]
    if effects is not None:
        blocks += _answer(effects) + _families(effects)
        blocks += contrast_section(design, trials, resamples, seed, effects.alpha)
    blocks += [doc.image(name, FIGURES[name]) for name in FIGURES if name in images]
    blocks += calibration
    blocks += _importance_blocks(importances)
    if effects is not None:
        blocks += [doc.heading("Method"), doc.text(_method(effects, design))]
    blocks += _trials_table(inputs)
    title = f"Sweep {inputs.sweep_id}"
    return Report(
        doc.markdown(blocks), doc.to_html(title, blocks, images), images, notes, effects, trials
    )


def _ranks(inputs: SweepInputs, row: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    found = inputs.ranks.get(str(row.get("trial_id")))
    return dict(found) if found else None


def _statistics(
    trials: list[Trial], notes: list[str], resamples: int, seed: int
) -> tuple[Design, Effects]:
    design = design_from_ranks(trials, notes)
    ranked = design is not None
    if design is None:
        design = design_from_metrics(trials)
    has_baseline = BASELINE_ARM in design.arms
    one_seed = int(design.present.sum(1).max()) == 1
    if not ranked:
        notes.append(NO_INTERVALS if one_seed else NO_RANKS)
    elif one_seed:
        notes.append(ONE_SEED)
    if not has_baseline:
        notes.append(NO_BASELINE)
    effects = bootstrap(design, has_baseline, resamples, seed=seed)
    if has_baseline:
        alone = [
            a for a, n in zip(effects.arms[1:], effects.paired_seeds[1:], strict=True) if not n
        ]
        if alone:
            notes.append(
                f"no seed shared with the baseline, so no change shown: {'; '.join(alone)}"
            )
    return design, effects


def _importances(
    trials: list[Trial], inputs: SweepInputs, notes: list[str]
) -> dict[str, dict[str, float]]:
    """Optuna's importances for the sweep's objective and for clean RSUM, arms valued at the
    mean over their seeds."""
    arms = {t.arm: t.params for t in trials}
    out: dict[str, dict[str, float]] = {}
    targets = dict.fromkeys([inputs.metric, "clean/rsum"])
    for target in targets:
        values = {}
        for arm in arms:
            seen = [t.metrics.get(target, math.nan) for t in trials if t.arm == arm]
            values[arm] = float(np.mean(seen))
        mode = inputs.mode if target == inputs.metric else "max"
        found, why = param_importances(arms, values, inputs.space, mode)
        if why and f"parameter importances: {why}" not in notes:
            notes.append(f"parameter importances: {why}")
        out[target] = found
    return out


def _figures(
    effects: Effects | None, trials: list[Trial], importances: Mapping[str, Mapping[str, float]]
) -> dict[str, bytes]:
    params = {t.arm: t.params for t in trials}
    made = {"importances.png": plots.importance_bars(importances)}
    if effects is not None:
        made["rsum_vs_epsilon.png"] = plots.epsilon_curves(effects, params)
        made["change_heatmap.png"] = plots.change_heatmap(effects)
        made["pareto.png"] = plots.pareto(effects, params)
    return {name: png for name, png in made.items() if png is not None}


def _overview(
    inputs: SweepInputs, trials: list[Trial], design: Design | None, resamples: int
) -> str:
    line = f"{len(inputs.rows)} trials, {len(trials)} finished, read from {inputs.source}."
    if design is None:
        return line
    queries = f"{design.i2t.shape[-1]} images and {design.t2i.shape[-1]} captions"
    return (
        f"{line} {len(design.arms)} arms, seeds {', '.join(map(str, design.seeds))}; "
        f"endpoints {', '.join(design.endpoints)}; {queries} per cell; "
        f"{resamples} bootstrap resamples. Objective: {inputs.metric} ({inputs.mode})."
    )


def _change(effects: Effects, a: int, e: int) -> tuple[float, float, float]:
    return effects.change[a, e], effects.low[a, e], effects.high[a, e]


def _verdict(effects: Effects, a: int, e: int) -> str:
    if math.isnan(effects.p_holm[a, e]):
        return "-"
    return "distinguishable" if effects.distinguishable[a, e] else "not distinguishable"


def _answer(effects: Effects) -> list[doc.Block]:
    """The headline: clean and mean corrupted RSUM per arm, changes and verdicts."""
    blocks = [doc.heading("Answer")]
    shown = [e for e in (CLEAN, CORRUPTED) if e in effects.endpoints]
    for endpoint in shown:
        e = effects.endpoints.index(endpoint)
        tested = ~np.isnan(effects.p_holm[:, e])
        yes = [a for a in range(len(effects.arms)) if effects.distinguishable[a, e]]
        said = "; ".join(
            f"{effects.arms[a]} ({doc.interval(*_change(effects, a, e), signed=True)})" for a in yes
        )
        blocks.append(
            doc.text(
                f"{LABELS[endpoint]}: {len(yes)} of {int(tested.sum())} arms distinguishable "
                f"from the baseline (Holm-adjusted p < {effects.alpha:g})"
                + (f": {said}." if yes else ".")
            )
        )
    header = ["arm", "seeds"]
    for endpoint in shown:
        name = LABELS[endpoint]
        header += [f"{name} [95 % CI]", "change [95 % CI]", "p (Holm)", "vs baseline"]
    rows = []
    for a, arm in enumerate(effects.arms):
        row = [arm, str(int(effects.seeds[a]))]
        for endpoint in shown:
            e = effects.endpoints.index(endpoint)
            level = (effects.level[a, e], effects.level_low[a, e], effects.level_high[a, e])
            p = effects.p_holm[a, e]
            row += [doc.interval(*level), doc.interval(*_change(effects, a, e), signed=True)]
            row += ["-" if math.isnan(p) else f"{p:.3g}", _verdict(effects, a, e)]
        rows.append(row)
    return [*blocks, doc.table(header, rows)]


def _families(effects: Effects) -> list[doc.Block]:
    """Change against the baseline per corruption family (extra: the held-out set)."""
    families = [e for e in effects.endpoints if e not in (CLEAN, CORRUPTED)]
    if not families or np.all(np.isnan(effects.change)):
        return []
    header = ["arm", *(f"{f} (held out)" if f == "extra" else f for f in families)]
    rows = []
    for a, arm in enumerate(effects.arms):
        if arm == BASELINE_ARM:
            continue
        row = [arm]
        for family in families:
            e = effects.endpoints.index(family)
            star = " *" if effects.distinguishable[a, e] else ""
            row.append(doc.interval(*_change(effects, a, e), signed=True) + star)
        rows.append(row)
    return [
        doc.heading("Change per corruption family"),
        doc.text(
            "Mean RSUM over each family's cells, arm minus baseline, with 95 % intervals; "
            "* distinguishable from the baseline (Holm across arms, per family)."
        ),
        doc.table(header, rows),
    ]


def _importance_blocks(importances: Mapping[str, Mapping[str, float]]) -> list[doc.Block]:
    targets = [t for t, v in importances.items() if v]
    if not targets:
        return []
    names = sorted({p for t in targets for p in importances[t]})
    rows = [[n, *(f"{importances[t].get(n, 0.0):.3f}" for t in targets)] for n in names]
    return [
        doc.heading("Parameter importances"),
        doc.text(
            "Optuna's get_param_importances with its fANOVA evaluator (seed 0; the default, "
            "PED-ANOVA, says 1/3 each for any handful of arms) on a study rebuilt from the "
            "finished arms, each valued at its mean over seeds; the baseline lies outside the "
            "search space and is not part of it. Shares of the variance between arms, not "
            "evidence of an effect: the intervals above say which effects are real."
        ),
        doc.table(["parameter", *targets], rows),
    ]


def _method(effects: Effects, design: Design) -> str:
    cells = "caption with its image" if design.text_to_image is not None else "caption on its own"
    return (
        "RSUM is recomputed from each trial's per-query ranks (Recall@K = 100 * mean(rank < K), "
        "RSUM = sum over both directions and K = 1, 5, 10); it equals the logged metric. "
        "Uncertainty combines evaluation queries and training seeds. Queries: a paired "
        f"bootstrap ({effects.resamples} resamples) draws images with replacement, one draw for "
        f"every arm, seed and corruption cell (each {cells}). Seeds: seed k of an arm pairs with "
        "seed k of the baseline, and the spread of the n per-seed changes is the training "
        "randomness. Standard error: sqrt(seed variance / n + query-bootstrap variance); "
        "interval: estimate +- t(0.975, n - 1) * SE (the normal with one seed, when it covers "
        "query noise only); p-value: two-sided, from t. Holm's step-down correction across the "
        "compared arms, per endpoint; an effect is distinguishable from the baseline when its "
        f"adjusted p-value is below {effects.alpha:g}. With 3 seeds t(0.975, 2) = 4.3: only "
        "effects well beyond the seed spread are distinguishable."
    )


def _trials_table(inputs: SweepInputs) -> list[doc.Block]:
    keys = list(dict.fromkeys(["clean/rsum", "agg/mean_corrupted_rsum", inputs.metric]))
    header = ["trial", "arm", "seed", "status", *keys]
    rows = []
    for r in inputs.rows:
        values = [r.get(k) for k in keys]
        shown = [f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else "-" for v in values]
        arm = r.get("arm") or "-"
        rows.append([str(r.get("trial_id")), arm, str(r.get(SEED, "-")), str(r.get("status"))])
        rows[-1] += shown
    return [doc.heading("Every trial"), doc.table(header, rows)]
