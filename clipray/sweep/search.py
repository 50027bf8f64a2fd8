"""Ray Tune search: our search spaces as Tune distributions, OptunaSearch, the baseline, ASHA.

The epsilon = 0 baseline is evaluated first in every sweep, as the reference for relative
robustness and mCE. It is not a point of the search space (epsilon = 0 is outside a log-uniform
range), so :class:`BaselineFirst` hands it out as the first trial itself and keeps it from Optuna;
Optuna's own trials then number ``num_samples - 1``. With ``sweep.seeds`` > 1, :class:`PairedSeeds`
runs every configuration (the baseline too) once per paired seed. Their state is saved with Tune's
experiment state, so a resumed sweep neither repeats the baseline nor loses Optuna's history.
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

from clipray.analysis.results import BASELINE_PARAM
from clipray.config.errors import ConfigError
from clipray.config.loading import get_path
from clipray.config.schema import Experiment
from clipray.config.space import Choice, Grid, IntRange, LogUniform, SearchSpace, Uniform
from clipray.core import storage

BASELINE_KEY = BASELINE_PARAM  # marks the baseline trial's config
SEED_KEY = "seed"  # the experiment's own seed, set per trial by PairedSeeds
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
        _save_wrapped(self, checkpoint_path, ("baseline_trial",))

    def restore(self, checkpoint_path: str) -> None:
        _restore_wrapped(self, checkpoint_path)


class PairedSeeds(Searcher):
    """Runs every configuration ``inner`` suggests with ``seeds`` paired seeds, one Tune trial
    each (seed k = ``base_seed + k``, the same for every arm); ``inner`` hears of the first trial
    of a configuration only, once all its seeds are done, with the mean over seeds."""

    def __init__(self, inner: Searcher, seeds: int, base_seed: int):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.seeds, self.base_seed = inner, seeds, base_seed
        self.open: tuple[str, dict[str, Any], int] | None = None  # (first trial, config, next k)
        self.first_of: dict[str, str] = {}  # trial id -> the first trial of its configuration
        self.done: dict[str, dict[str, dict | None]] = {}  # first trial -> {trial: result}

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.open is None:
            config = self.inner.suggest(trial_id)
            if not isinstance(config, dict):
                return config  # None (wait) or Searcher.FINISHED
            self.open, self.done[trial_id] = (trial_id, config, 0), {}
        first, config, k = self.open
        self.open = (first, config, k + 1) if k + 1 < self.seeds else None
        self.first_of[trial_id] = first
        return {**config, SEED_KEY: self.base_seed + k}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.first_of.get(trial_id) == trial_id:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        first = self.first_of.get(trial_id)
        if first is None:
            return
        results = self.done[first]
        if results.get(trial_id) is not None:
            return  # counted already (a trial completes once; a re-run success replaces an error)
        told = len(results) == self.seeds  # inner heard of this configuration already
        results[trial_id] = None if error else result
        if len(results) == self.seeds and not told:
            values = list(results.values())
            failed = any(r is None for r in values)
            self.inner.on_trial_complete(first, result=mean_result(values), error=failed)

    def save(self, checkpoint_path: str) -> None:
        _save_wrapped(self, checkpoint_path, ("open", "first_of", "done"))

    def restore(self, checkpoint_path: str) -> None:
        _restore_wrapped(self, checkpoint_path)


def mean_result(results: list[dict | None]) -> dict | None:
    """The mean over seeds of every number all of them report (None if one has no result)."""
    if not results or any(r is None for r in results):
        return None
    shared = set.intersection(*(set(r) for r in results))  # type: ignore[arg-type]
    numbers = [k for k in results[0] if k in shared and _is_number(results[0][k])]
    return {k: sum(r[k] for r in results) / len(results) for k in numbers}  # type: ignore[index]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _save_wrapped(searcher: Any, checkpoint_path: str, fields: tuple[str, ...]) -> None:
    """Pickle ``fields`` of a wrapping searcher together with its inner searcher's own state."""
    with tempfile.TemporaryDirectory() as tmp:
        inner_path = os.path.join(tmp, "inner.pkl")
        searcher.inner.save(inner_path)
        with open(inner_path, "rb") as f:
            inner_state = f.read()
    with open(checkpoint_path, "wb") as f:
        pickle.dump({**{k: getattr(searcher, k) for k in fields}, "inner": inner_state}, f)


def _restore_wrapped(searcher: Any, checkpoint_path: str) -> None:
    with open(checkpoint_path, "rb") as f:
        state = pickle.load(f)
    inner_state = state.pop("inner")
    for k, v in state.items():
        setattr(searcher, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        inner_path = os.path.join(tmp, "inner.pkl")
        with open(inner_path, "wb") as f:
            f.write(inner_state)
        searcher.inner.restore(inner_path)


def make_searcher(exp: Experiment, space: SearchSpace) -> Searcher:
    """Optuna, behind the baseline (when there is one), behind paired seeds (when more than one)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial table says what matters
    metric, mode = objectives(exp)
    inner = OptunaSearch(metric=metric, mode=mode, sampler=_sampler(exp, space))
    first = BaselineFirst(inner, baseline_point(exp, space) if exp.sweep.baseline else None)
    return PairedSeeds(first, exp.sweep.seeds, exp.seed) if exp.sweep.seeds > 1 else first


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
