"""``clipray sweep``: Ray Tune + Optuna over feature-perturbation configs, every trial trained with
Ray Train, scored by the sweep's actor pool, logged to MLflow, resumable after any crash.

Layout on storage (``<storage>/<name>/``): Tune's experiment state, ``clipray_sweep.json`` (the
manifest: sweep id, resolved config, search space, MLflow ids — what ``--resume`` checks and
reuses), ``train/<trial id>/`` (each trial's Ray Train run and checkpoints),
``baseline_metrics.json`` (the epsilon = 0 trial's scores, the reference for mCE) and
``best_config.yaml``.

This module is the driver: the manifest, Ray, the Tuner and the end-of-sweep summary. What runs
inside each trial is :mod:`clipray.trial`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray
import yaml
from ray import tune

from clipray import storage
from clipray.config import ConfigError, Experiment, experiment_from_dict
from clipray.distributed import HISTORY_FILE, TRAIN_ENV
from clipray.metrics import retrieval_keys
from clipray.report import trials_csv, trials_table
from clipray.scoring import ScorerPool, with_reference
from clipray.searcher import (
    BASELINE_KEY,
    make_scheduler,
    make_searcher,
    tune_space,
)
from clipray.space import SearchSpace
from clipray.tracking import (
    TRIAL_TAG,
    Tracking,
    artifact_root,
    find_run,
    finish,
    flatten,
    get_or_create_experiment,
    log_artifacts,
    log_metrics,
    log_params,
    metric_steps,
    prepare_backend,
    resolve_uri,
    runs_of_sweep,
    set_tags,
    sweep_run,
)
from clipray.trial import BASELINE, Plan, describe, run_trial, trial_experiment

MANIFEST = "clipray_sweep.json"
RAY_ENV = {  # the Train settings (clipray.distributed.TRAIN_ENV) and the sweep driver's
    **TRAIN_ENV,
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # epoch reports carry no corrupted metrics yet
    "RAY_AIR_NEW_OUTPUT": "0",  # the classic trial table, with the columns we choose
}


# ------------------------------------------------------------------------------ driver side
def check_inputs(exp: Experiment, space: SearchSpace) -> None:
    """What the config alone can get wrong, found before anything is written or started."""
    from clipray.scoring_plan import resolve_cache_dir, result_keys

    known = result_keys(exp.eval, reference=exp.sweep.baseline)
    if exp.sweep.metric not in known:
        agg = sorted(k for k in known if k.startswith("agg/") and k.count("/") == 1)
        raise ConfigError(
            f"sweep.metric: {exp.sweep.metric!r} is not a scoring result for these corruptions "
            f"and severities; e.g. {', '.join(agg)}, clean/rsum or corrupt/<name>/s<k>/rsum"
            + ("" if exp.sweep.baseline else " (agg/mce and relative_* need sweep.baseline)")
        )
    epoch_keys = [f"val/{k}" for k in retrieval_keys()]
    if exp.sweep.asha.enabled and exp.sweep.asha.metric not in epoch_keys:
        raise ConfigError(
            f"sweep.asha.metric: {exp.sweep.asha.metric!r} is not a per-epoch metric (higher is "
            f"better); one of {', '.join(epoch_keys)}"
        )
    make_searcher(exp, space)  # the sampler's own constraints (grid: choice params only)
    resolve_cache_dir(exp)  # remote storage needs an explicit eval.cache_dir


def check_destination(exp: Experiment, space: SearchSpace, resume: bool) -> Plan | None:
    """Storage writable, tracking reachable, and the sweep directory right for a new sweep (None)
    or for a resume (the saved plan). Writes only a probe file and the tracking schema."""
    directory = storage.join(storage.absolute(exp.storage), exp.name)
    storage.check_writable(storage.absolute(exp.storage), "storage")
    manifest = storage.join(directory, MANIFEST)
    if storage.exists(manifest):
        if not resume:
            raise ConfigError(
                f"{directory}: a sweep named {exp.name!r} is already there; resume it with "
                "--resume, or choose another name (--set name=...)"
            )
        saved = _read_manifest(manifest)
        same = _same_config(saved["experiment"], exp.to_dict())
        if not same or saved["space"] != _space_dict(space):
            raise ConfigError(f"{directory}: that sweep was run with a different config or space")
        return _plan(saved, directory)
    if resume:
        raise ConfigError(f"{directory}: not a clipray sweep (no {MANIFEST}); nothing to resume")
    prepare_backend(resolve_uri(exp))
    return None


def start_plan(exp: Experiment, space: SearchSpace) -> Plan:
    """A new sweep: its MLflow parent run (config, space, commit) and the manifest."""
    directory = storage.join(storage.absolute(exp.storage), exp.name)
    uri = resolve_uri(exp)
    experiment_id = get_or_create_experiment(uri, exp.tracking.experiment, artifact_root(exp, uri))
    sweep_id = f"{exp.name}-{uuid.uuid4().hex[:8]}"
    tracking = Tracking(uri, experiment_id, sweep_run(uri, experiment_id, sweep_id, exp.name))
    plan = Plan(sweep_id, directory, exp.to_dict(), _space_dict(space), tracking)
    client = tracking.client()
    log_params(client, tracking.parent_run_id, {**flatten(exp.to_dict()), "sweep_id": sweep_id})
    log_artifacts(
        client,
        tracking.parent_run_id,
        {
            "config.yaml": yaml.safe_dump(exp.to_dict(), sort_keys=False),
            "search_space.yaml": yaml.safe_dump(plan.space, sort_keys=False),
        },
    )
    storage.write_json(
        storage.join(directory, MANIFEST), {**asdict(plan), "tracking": asdict(tracking)}
    )
    return plan


def _read_manifest(path: str) -> dict[str, Any]:
    saved = storage.read_json(path)  # not JSON: a ValueError, reported as one line
    keys = ("sweep_id", "experiment", "space", "tracking")
    if not isinstance(saved, dict) or not all(k in saved for k in keys):
        raise ConfigError(f"{path}: not a clipray sweep manifest (needs {', '.join(keys)})")
    return saved


def _same_config(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """The manifest's config is this one; where storage is (found there, so) aside."""
    return {**saved, "storage": None} == {**current, "storage": None}


def _space_dict(space: SearchSpace) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") for k, v in space.params.items()}


def _saved(directory: str) -> tuple[str, dict[str, Any]]:
    """A sweep directory (absolute) and its manifest; one line when it is not a sweep."""
    directory = storage.absolute(directory).rstrip("/")
    manifest = storage.join(directory, MANIFEST)
    if not storage.exists(manifest):
        raise ConfigError(f"{directory}: not a clipray sweep (no {MANIFEST})")
    return directory, _read_manifest(manifest)


def _plan(saved: dict[str, Any], directory: str) -> Plan:
    tracking = Tracking(**saved["tracking"])
    return Plan(saved["sweep_id"], directory, saved["experiment"], saved["space"], tracking)


def load_plan(directory: str) -> tuple[Experiment, SearchSpace]:
    """Experiment and space of an existing sweep directory (``clipray resume DIR``), with its
    storage where DIR is (a relative ``storage`` was relative to where the sweep started)."""
    from clipray.space import parse_space

    directory, saved = _saved(directory)
    if directory.rsplit("/", 1)[-1] != saved["experiment"]["name"]:
        raise ConfigError(
            f"{directory}: holds the sweep {saved['experiment']['name']!r}; a sweep directory "
            "must keep its name"
        )
    raw = {**saved["experiment"], "storage": directory.rsplit("/", 1)[0]}
    where = storage.join(directory, MANIFEST)
    return experiment_from_dict(raw, where), parse_space(saved["space"], where)


def saved_plan(directory: str) -> Plan:
    """The plan recorded in a sweep directory (``clipray report DIR``)."""
    directory, saved = _saved(directory)
    return _plan(saved, directory)


def check_resources(exp: Experiment, have: dict[str, float], local: bool) -> None:
    """The pool plus one trial must fit in ``have`` (the cluster's resources), or the first
    trial would wait forever; on a cluster that may grow, only a warning."""
    sc, tr = exp.eval.scorers, exp.train
    gpu = tr.use_gpu == "yes" or (tr.use_gpu == "auto" and have.get("GPU", 0) > 0)
    trial_gpus = tr.num_workers if gpu else 0
    needs = {
        "CPU": (
            sc.num_actors * sc.cpus_per_actor
            + exp.sweep.cpus_per_trial
            + tr.num_workers * tr.cpus_per_worker,
            f"eval.scorers / train.cpus_per_worker / sweep.cpus_per_trial: the scorer pool "
            f"({sc.num_actors} x {sc.cpus_per_actor} CPU) and one trial ({exp.sweep.cpus_per_trial}"
            f" + {tr.num_workers} x {tr.cpus_per_worker} CPU)",
        ),
        "GPU": (
            sc.num_actors * sc.gpus_per_actor + trial_gpus,
            f"eval.scorers.gpus_per_actor / train.use_gpu: the scorer pool ({sc.num_actors} x "
            f"{sc.gpus_per_actor} GPU) and one trial ({trial_gpus} GPU)",
        ),
    }
    for what, (need, message) in needs.items():
        if need > have.get(what, 0.0) + 1e-9:
            message = f"{message} need {need:g} {what}s; this Ray cluster has {have.get(what, 0):g}"
            if local:
                raise ConfigError(message)
            print(f"warning: {message} (waiting for the autoscaler)", flush=True)


def init_ray() -> bool:
    """Join the cluster when there is one (RAY_ADDRESS / ray up), else start Ray here.

    Returns whether Ray runs on this machine only (and no autoscaler may add nodes).
    """
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    if not ray.is_initialized():
        runtime_env = {
            "env_vars": {k: os.environ[k] for k in RAY_ENV},
            "worker_process_setup_hook": "clipray._ray_setup.quiet_logs",
        }
        address = os.environ.get("RAY_ADDRESS")
        try:
            ray.init(runtime_env=runtime_env)  # the dashboard also serves Ray's state API
        except ConnectionError as e:
            raise ConfigError(f"RAY_ADDRESS: no Ray cluster at {address!r} ({e})") from None
    alive = [n for n in ray.nodes() if n["Alive"]]
    return not os.environ.get("RAY_ADDRESS") and len(alive) == 1


class _EpochsToMlflow(tune.Callback):
    """Logs each trial's per-checkpoint metrics to its MLflow run, from the sweep driver only.

    Live, as each checkpoint is reported; at the trial's last report, any step a crash left out
    is filled in from the checkpoint's history. One writer, so no step is logged twice; steps a
    run already holds are skipped (a replay after a crash). The driver has MLflow loaded
    already, so logging costs training nothing.
    """

    KEYS = ("train/", "val/", "time/")

    def __init__(self, tracking: Tracking, objective: str):
        self.tracking, self.objective = tracking, objective
        self._runs: dict[str, tuple[str, set[int]]] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's state: no caches
        return {"tracking": self.tracking, "objective": self.objective, "_runs": {}}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "step" not in result:
            return
        client = self.tracking.client()
        if trial.trial_id not in self._runs:
            run_id = find_run(client, self.tracking.experiment_id, TRIAL_TAG, trial.trial_id)
            if run_id is None:
                return
            self._runs[trial.trial_id] = (run_id, metric_steps(client, run_id, "train/loss"))
        run_id, steps = self._runs[trial.trial_id]
        last = self.objective in result or result.get("early_stopped")
        history = _history(result["checkpoint_path"]) if last else [result]
        for entry in history:
            metrics = {k: v for k, v in entry.items() if k.startswith(self.KEYS) or k == "epoch"}
            log_metrics(client, run_id, metrics, int(entry["step"]), steps)


def _history(checkpoint: str) -> list[dict[str, Any]]:
    """A trial checkpoint's per-checkpoint metrics (none from a checkpoint without the file)."""
    path = storage.join(checkpoint, HISTORY_FILE)
    return storage.read_json(path) if storage.exists(path) else []


class _TrialLines(tune.Callback):
    """One line per finished trial, on the driver."""

    def __init__(self, metric: str):
        self.metric = metric  # (pickled into Tune's experiment state: plain values only)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        if self.metric not in r:  # stopped early by ASHA (or failed: Tune reports that)
            if r.get("early_stopped"):
                print(
                    f"trial {trial.trial_id} stopped early by ASHA after epoch "
                    f"{r.get('epoch', 0):g} (val rsum {r.get('val/rsum', float('nan')):.1f})",
                    flush=True,
                )
            return
        what = "baseline (epsilon=0)" if trial.config.get(BASELINE_KEY) else describe(trial.config)
        nan = float("nan")
        print(
            f"trial {trial.trial_id} done: {what} | clean rsum {r.get('clean/rsum', nan):.1f}"
            f" | {self.metric} {r.get(self.metric, nan):.1f}"
            f" | robustness {r.get('agg/relative_robustness', nan):.3f}"
            f" | {r.get('time_total_s', 0):.0f}s",
            flush=True,
        )


def _tuner(exp: Experiment, space: SearchSpace, plan: Plan, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), {"CPU": exp.sweep.cpus_per_trial}
    )
    if resume and tune.Tuner.can_restore(plan.directory):
        return tune.Tuner.restore(
            plan.directory, trainable, resume_unfinished=True, resume_errored=True
        )
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(exp, space),
            scheduler=make_scheduler(exp, plan.directory),
            num_samples=exp.sweep.num_samples,
            max_concurrent_trials=exp.sweep.max_concurrent_trials,
            reuse_actors=True,  # no trial is killed (ASHA stops are cooperative), so reuse
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=storage.absolute(exp.storage),
            callbacks=[
                _TrialLines(exp.sweep.metric),
                _EpochsToMlflow(plan.tracking, exp.sweep.metric),
            ],
            failure_config=tune.FailureConfig(max_failures=1),
            progress_reporter=_reporter(exp, space),
            verbose=1,
        ),
    )


def _reporter(exp: Experiment, space: SearchSpace) -> tune.CLIReporter:
    """Tune's trial table: the searched values, training progress and the objective."""
    return tune.CLIReporter(
        parameter_columns={p: p.split(".")[-1] for p in space.params},
        metric_columns={
            "epoch": "epoch",
            "train/loss": "loss",
            "val/rsum": "val rsum",
            "clean/rsum": "clean rsum",
            exp.sweep.metric: exp.sweep.metric.split("/")[-1],
        },
        max_report_frequency=30,
    )


@dataclass
class SweepSummary:
    sweep_id: str
    directory: str
    trials: int  # finished: scored, or stopped early by ASHA
    best_trial: str | None
    best_value: float | None
    best_checkpoint: str | None
    tracking_uri: str
    expected: int = 0  # num_samples
    failed: int = 0  # trials that ended in an error (after their retries)

    @property
    def complete(self) -> bool:
        return self.trials >= self.expected and not self.failed


def run_sweep(
    exp: Experiment, space: SearchSpace, resume: bool = False, out: Callable[[str], None] = print
) -> SweepSummary:
    """Run (or resume) a sweep to ``num_samples`` trials; returns where the best one is."""
    t0 = time.perf_counter()
    # 1. All bad input fails here, before the manifest or any MLflow run is written.
    check_inputs(exp, space)
    plan = check_destination(exp, space, resume)
    local = init_ray()
    check_resources(exp, ray.cluster_resources(), local)
    plan = plan or start_plan(exp, space)
    client = plan.tracking.client()
    client.update_run(plan.tracking.parent_run_id, status="RUNNING")  # again, on a resume
    out(f"sweep {plan.sweep_id}: {exp.sweep.num_samples} trials, results in {plan.directory}")
    pool = None
    try:
        # 2. The scorer pool shared by all trials (its corrupted set comes from the cache).
        pool = ScorerPool.create(exp, name=plan.pool_name)
        info = pool.ready()
        out(
            f"scorer pool ready: {info['corrupted_cells']} corruption x severity cells on "
            f"{info['actors']} actors, {info['builds']} built, {info['hits']} from cache "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        # 3. Search: Tune + Optuna (+ ASHA), the baseline first.
        results = _tuner(exp, space, plan, resume).fit()
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        finish(client, plan.tracking.parent_run_id, status="KILLED" if interrupted else "FAILED")
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    # 4. Wrap up: baseline aggregates for early finishers, the best trial, the parent run.
    return _summarise(exp, plan, results, out)


def _summarise(
    exp: Experiment, plan: Plan, results: Any, out: Callable[[str], None]
) -> SweepSummary:
    metric = exp.sweep.metric
    client = plan.tracking.client()
    scored = [r for r in results if r.metrics and metric in r.metrics]
    stopped = [r for r in results if r.metrics and r.metrics.get("early_stopped")]
    _backfill_reference(client, plan, scored)
    best = None
    if scored:
        best = max(scored, key=lambda r: r.metrics[metric] * (1 if exp.sweep.mode == "max" else -1))
        _record_best(client, exp, plan, best, len(scored))
    summary = SweepSummary(
        plan.sweep_id,
        plan.directory,
        len(scored) + len(stopped),
        best.metrics.get("trial_id") if best else None,
        best.metrics[metric] if best else None,
        best.metrics.get("checkpoint_path") if best else None,
        plan.tracking.uri,
        expected=exp.sweep.num_samples,
        failed=results.num_errors,
    )
    table, csv_text = report(plan)
    storage.write_text(storage.join(plan.directory, REPORT), csv_text)
    out(table)
    # Interrupted (Tune takes Ctrl-C and returns) or failed trials: the sweep is not finished.
    status = "FINISHED" if summary.complete else "FAILED" if summary.failed else "KILLED"
    finish(client, plan.tracking.parent_run_id, status=status)
    for line in summary_lines(summary, metric):
        out(line)
    return summary


REPORT = "results.csv"  # every trial of the sweep, one row each, in the sweep directory
REPORT_METRICS = (
    ("clean rsum", "clean/rsum"),
    ("relative robustness", "agg/relative_robustness"),
    ("mCE", "agg/mce"),
)


def report(plan: Plan) -> tuple[str, str]:
    """Every trial of the sweep from its MLflow runs, best first: a markdown table for the
    console, and CSV (searched values and metrics at full precision) for analysis."""
    exp = experiment_from_dict(plan.experiment, "sweep manifest")
    metric, sign = exp.sweep.metric, 1 if exp.sweep.mode == "max" else -1
    metrics = dict.fromkeys([metric, *(k for _, k in REPORT_METRICS)])
    rows = []
    for run in runs_of_sweep(plan.tracking.client(), plan.tracking):
        row: dict[str, Any] = {
            "trial_id": run.data.tags.get(TRIAL_TAG, ""),
            "trial": run.info.run_name,
            "status": run.info.status,
        }
        row |= {path: run.data.params.get(path, "") for path in plan.space}
        row |= {k: run.data.metrics.get(k, float("nan")) for k in metrics}
        rows.append(row)
    rows.sort(key=lambda r: (r[metric] != r[metric], -sign * r[metric]))  # NaN (unscored) last
    columns = [("trial", "trial"), ("status", "status"), (metric, metric), *REPORT_METRICS]
    keys = ["trial_id", "trial", "status", *plan.space, *metrics]
    return trials_table(rows, columns), trials_csv(rows, keys)


def _backfill_reference(client: Any, plan: Plan, scored: list) -> None:
    """Trials that finished before the baseline get their mCE-style aggregates now."""
    path = storage.join(plan.directory, BASELINE)
    if not storage.exists(path):
        return
    reference = storage.read_json(path)
    for r in scored:
        run_id = r.metrics["mlflow_run_id"]
        if "agg/mce" not in client.get_run(run_id).data.metrics:
            extra = with_reference(r.metrics, reference)
            extra = {k: v for k, v in extra.items() if k not in r.metrics}
            log_metrics(client, run_id, extra, int(r.metrics["step"]), set())


def _record_best(client: Any, exp: Experiment, plan: Plan, best: Any, scored: int) -> None:
    """best_config.yaml / best_trial.json on storage, and on the sweep's MLflow run."""
    metric = exp.sweep.metric
    best_exp = trial_experiment(plan.experiment, best.config)
    best_exp = best_exp.model_copy(update={"name": f"{exp.name}-best"})  # its own output dir
    record = {
        "trial_id": best.metrics["trial_id"],
        metric: best.metrics[metric],
        "checkpoint": best.metrics["checkpoint_path"],
        "config": best_exp.to_dict(),
    }
    config_yaml = yaml.safe_dump(best_exp.to_dict(), sort_keys=False)
    storage.write_json(storage.join(plan.directory, "best_trial.json"), record)
    storage.write_text(storage.join(plan.directory, "best_config.yaml"), config_yaml)
    run_id = plan.tracking.parent_run_id
    log_artifacts(
        client,
        run_id,
        {"best_config.yaml": config_yaml, "best_trial.json": json.dumps(record, indent=1)},
    )
    set_tags(
        client,
        run_id,
        {"clipray.best_trial": record["trial_id"], "clipray.best_checkpoint": record["checkpoint"]},
    )
    best_metrics = {f"best/{metric}": best.metrics[metric], "trials_scored": scored}
    log_metrics(client, run_id, best_metrics, scored, metric_steps(client, run_id, "trials_scored"))


def summary_lines(s: SweepSummary, metric: str) -> list[str]:
    ui = (
        f"mlflow ui --backend-store-uri {s.tracking_uri}"
        if s.tracking_uri.startswith("sqlite")
        else f"open {s.tracking_uri}"
    )
    if s.complete:
        trials = f"{s.trials} trial{'s' * (s.trials != 1)}"
        lines = [f"sweep {s.sweep_id} finished: {trials} in {s.directory}"]
    else:
        failed = f", {s.failed} failed (see their error.txt there)" if s.failed else ""
        lines = [
            f"sweep {s.sweep_id} incomplete: {s.trials} of {s.expected} trials finished{failed}; "
            f"continue it with: clipray resume {s.directory}"
        ]
    if s.best_trial is not None:
        lines += [
            f"best trial {s.best_trial}: {metric} = {s.best_value:.2f}",
            f"best checkpoint: {s.best_checkpoint}",
            f"best config: {storage.join(s.directory, 'best_config.yaml')}",
        ]
    lines.append(f"every trial: {storage.join(s.directory, REPORT)} (clipray report {s.directory})")
    lines.append(f"compare runs in MLflow: {ui}")
    return lines
