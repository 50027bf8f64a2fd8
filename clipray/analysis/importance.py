"""Parameter importances by Optuna's own evaluator, from a sweep's finished arms.

The Optuna study is rebuilt from the finished trials rather than read from the sweep's saved
searcher state: that works the same from a sweep directory and from MLflow, and counts each arm
once, valued at the mean over its seeds (what the sweep's Optuna is told). Distributions come from
the sweep's search space; the baseline (epsilon = 0 lies outside a log-scale range) and arms with
a value outside the space are left out.

The evaluator is Optuna's fANOVA (seeded, so a report is reproducible), not
``get_param_importances``' default, PED-ANOVA: PED-ANOVA compares the top 10 % of trials with
the rest, and a study's handful of arms has one trial in its top 10 %, so it returns equal
importances whatever the values (measured on the 8-arm grid of ``sweeps/study.yaml``: 1/3 each
even with a planted tower effect ten times the noise, where fANOVA gives the tower 0.97;
``tests/test_report.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

MIN_ARMS = 3  # importances from fewer points are noise


def distribution(spec: Mapping[str, Any]) -> BaseDistribution:
    """Optuna's distribution for one search-space entry (``clipray.config.space`` types)."""
    kind = spec["type"]
    if kind in ("choice", "grid"):
        return CategoricalDistribution(list(spec["values"]))
    if kind in ("uniform", "loguniform"):
        return FloatDistribution(spec["low"], spec["high"], log=kind == "loguniform")
    if kind == "int":
        step = 1 if spec.get("log") else spec.get("step", 1)
        return IntDistribution(spec["low"], spec["high"], log=spec.get("log", False), step=step)
    raise ValueError(f"unknown search-space type {kind!r}")


def _value(dist: BaseDistribution, value: Any) -> Any:
    """``value`` (as read back from a table: "2", 2.0) in the form ``dist`` holds, or None."""
    if isinstance(dist, CategoricalDistribution):
        same = [c for c in dist.choices if c == value or str(c) == str(value)]
        return same[0] if same else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if isinstance(dist, IntDistribution):
        number = int(round(number))
    inside = dist.low <= number <= dist.high  # (a log scale's low is > 0)
    return number if inside else None


def param_importances(
    arms: Mapping[str, Mapping[str, Any]],
    values: Mapping[str, float],
    space: Mapping[str, Mapping[str, Any]],
    mode: str,
) -> tuple[dict[str, float], str | None]:
    """{param: normalised importance} of ``values`` (one per arm, ``arms`` its searched values)
    over ``space``; with a one-line reason instead when there is too little to say."""
    dists = {k: distribution(v) for k, v in space.items()}
    dists = {k: d for k, d in dists.items() if not d.single()}
    trials = []
    for arm, value in values.items():
        params = {k: _value(d, arms[arm].get(k)) for k, d in dists.items()}
        if math.isfinite(value) and all(v is not None for v in params.values()):
            trials.append(
                optuna.trial.create_trial(params=params, distributions=dists, value=value)
            )
    if not dists:
        return {}, "no searched parameter takes more than one value"
    if len(trials) < MIN_ARMS:
        return {}, f"{len(trials)} arm(s) inside the search space; importances need {MIN_ARMS}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "a new study created" line
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        study.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental-feature warnings
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
            return {k: float(v) for k, v in found.items()}, None
    except (RuntimeError, ValueError) as e:  # e.g. every value equal
        return {}, f"Optuna could not assess importances ({e})"
    finally:
        optuna.logging.set_verbosity(verbosity)
