"""Ray Tune search: our search spaces as Tune distributions, OptunaSearch, the baseline, ASHA.

The epsilon = 0 baseline is evaluated first in every sweep, as the reference for relative
robustness and mCE. It is not a point of the search space (epsilon = 0 is outside a log-uniform
range), so :class:`BaselineFirst` hands it out as the first trial itself and keeps it from Optuna;
Optuna's own trials then number ``num_samples - 1``. Its state is saved with Tune's experiment
state, so a resumed sweep neither repeats the baseline nor loses Optuna's history.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from clipray.config.errors import ConfigError
from clipray.config.loading import get_path
from clipray.config.schema import Experiment
from clipray.config.space import Choice, Grid, IntRange, LogUniform, SearchSpace, Uniform
from clipray.core import storage

BASELINE_KEY = "clipray.baseline"  # marks the baseline trial's config
CLEAN_OBJECTIVE = "clean/rsum"  # the second objective of multi-objective sweeps


def tune_space(space: SearchSpace) -> dict[str, Any]:
    """Our distributions as Tune's (``grid`` is a categorical for Optuna; see ``sampler: grid``)."""
    out: dict[str, Any] = {}
    for path, d in space.params.items():
        if isinstance(d, (Choice, Grid)):
            out[path] = tune.choice(list(d.values))
        elif isinstance(d, LogUniform):
            out[path] = tune.loguniform(d.low, d.high)
        elif isinstance(d, Uniform):
            out[path] = tune.uniform(d.low, d.high)
        elif isinstance(d, IntRange) and d.log:
            out[path] = tune.lograndint(d.low, d.high + 1)  # Tune's upper bound is exclusive
        elif isinstance(d, IntRange) and d.step == 1:
            out[path] = tune.randint(d.low, d.high + 1)
        elif isinstance(d, IntRange):
            out[path] = tune.qrandint(d.low, d.high, d.step)  # quantised: upper is inclusive
    return out


def _sampler(exp: Experiment, space: SearchSpace) -> optuna.samplers.BaseSampler:
    seed = exp.sweep.searcher.seed
    kind = exp.sweep.searcher.sampler
    if kind == "grid":
        continuous = [p for p, d in space.params.items() if not isinstance(d, (Choice, Grid))]
        if continuous:
            raise ConfigError(
                f"sweep.searcher.sampler: 'grid' needs choice/grid params only, not {continuous}"
            )
        return optuna.samplers.GridSampler(
            {p: list(d.values) for p, d in space.params.items()}, seed=seed
        )
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    return samplers[kind]()


def objectives(exp: Experiment) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) for the searcher: one objective, or clean and corrupted retrieval."""
    if exp.sweep.searcher.multi_objective:
        return [CLEAN_OBJECTIVE, exp.sweep.metric], ["max", exp.sweep.mode]
    return exp.sweep.metric, exp.sweep.mode


def baseline_point(exp: Experiment, space: SearchSpace) -> dict[str, Any]:
    """Config of the epsilon = 0 trial: clean training, whatever the space says.

    Every searched path gets a value (the sweep file's own), as Tune fills missing keys with
    unsampled distributions.
    """
    base = exp.to_dict()
    point = {path: get_path(base, path) for path in space.params}
    return {**point, "perturb.epsilon": 0.0, BASELINE_KEY: True}


class BaselineFirst(Searcher):
    """Suggests the baseline first, then defers to ``inner``; Optuna never sees the baseline."""

    def __init__(self, inner: Searcher, baseline: dict[str, Any] | None):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.baseline = baseline
        self.baseline_trial: str | None = None

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.baseline is not None and self.baseline_trial is None:
            self.baseline_trial = trial_id
            return dict(self.baseline)
        return self.inner.suggest(trial_id)

    def _has_objectives(self, result: dict | None) -> bool:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        return result is not None and all(m in result for m in metrics)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial and self._has_objectives(result):
            self.inner.on_trial_result(trial_id, result)  # epoch reports lack the objective

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """A trial without its objectives (stopped early, or failed) is PRUNED (or FAIL) in
        Optuna, single- or multi-objective alike."""
        if trial_id != self.baseline_trial:
            result = result if self._has_objectives(result) else None
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            inner_path = os.path.join(tmp, "inner.pkl")
            self.inner.save(inner_path)
            with open(inner_path, "rb") as f:
                inner_state = f.read()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"baseline_trial": self.baseline_trial, "inner": inner_state}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.baseline_trial = state["baseline_trial"]
        with tempfile.TemporaryDirectory() as tmp:
            inner_path = os.path.join(tmp, "inner.pkl")
            with open(inner_path, "wb") as f:
                f.write(state["inner"])
            self.inner.restore(inner_path)


def make_searcher(exp: Experiment, space: SearchSpace) -> BaselineFirst:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial table says what matters
    metric, mode = objectives(exp)
    inner = OptunaSearch(metric=metric, mode=mode, sampler=_sampler(exp, space))
    return BaselineFirst(inner, baseline_point(exp, space) if exp.sweep.baseline else None)


STOP_MARKER = "EARLY_STOP.json"


def stop_marker_path(sweep_dir: str, trial_id: str) -> str:
    """Where the scheduler asks a trial's training to end (next to its Train run)."""
    return storage.join(sweep_dir, "train", trial_id, STOP_MARKER)


class CooperativeASHA(ASHAScheduler):
    """ASHA whose stops the trial carries out itself, at its next checkpoint.

    Tune stopping a trial would end the trial's process while its Ray Train run is still
    going, and that run's workers and placement group can outlive it and starve the next trial.
    So a STOP becomes a marker file the trial's workers read after each checkpoint; the run then
    ends normally and releases its resources. Never stopped: the baseline (every other trial is
    measured against it) and a trial past its last epoch (what remains is scoring).
    """

    def __init__(self, sweep_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.sweep_dir = sweep_dir

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        finished = result.get(self._time_attr, 0) >= self._max_t
        if decision == TrialScheduler.STOP and not (trial.config.get(BASELINE_KEY) or finished):
            marker = stop_marker_path(self.sweep_dir, trial.trial_id)
            storage.write_json(
                marker,
                {
                    "epoch": result.get(self._time_attr),
                    "by": "ASHA",
                    self._metric: result.get(self._metric),
                },
            )
        return TrialScheduler.CONTINUE


def make_scheduler(exp: Experiment, sweep_dir: str) -> TrialScheduler:
    """ASHA on a per-epoch clean metric when enabled; otherwise run every trial to the end."""
    asha = exp.sweep.asha
    if not asha.enabled:
        return FIFOScheduler()
    return CooperativeASHA(
        sweep_dir,
        time_attr="epoch",
        metric=asha.metric,
        mode="max",
        max_t=exp.train.epochs,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )
