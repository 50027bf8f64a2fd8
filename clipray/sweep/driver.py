"""``clipray sweep``: Ray Tune + Optuna over feature-perturbation configs, every trial trained with
Ray Train, scored by the sweep's actor pool, logged to MLflow, resumable after any crash.

Layout on storage (``<storage>/<name>/``): Tune's experiment state, ``clipray_sweep.json`` (the
manifest, :mod:`clipray.sweep.manifest`), ``train/<trial id>/`` (each trial's Ray Train run and
checkpoints), ``baseline_metrics.json`` (the epsilon = 0 trial's scores, the reference for mCE),
``best_config.yaml``, ``results.csv`` and ``report/`` (report.md, report.html, plots).

This module is the driver's sequence of steps; what runs inside each trial is
:mod:`clipray.sweep.trial`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

from clipray.config.errors import ConfigError, StoppedError, brief
from clipray.config.paths import check_output_dir
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace, largest_batch
from clipray.core import storage
from clipray.core.datacheck import check_dataset
from clipray.core.metrics import retrieval_keys
from clipray.scoring.plan import resolve_cache_dir, result_keys
from clipray.scoring.pool import ScorerPool
from clipray.sweep.callbacks import (
    EpochsToMlflow,
    RetireOrphans,
    StorageWatch,
    TrialLines,
    TuneStateBackup,
    repair_tune_state,
    storage_failure,
    trial_table,
)
from clipray.sweep.manifest import Plan, check_destination, start_plan
from clipray.sweep.report import (
    REPORT,
    SweepSummary,
    backfill_reference,
    closing_lines,
    record_best,
    report,
    report_at_end,
)
from clipray.sweep.runtime import (
    check_ray_address,
    check_resources,
    check_storage_reach,
    init_ray,
)
from clipray.sweep.search import make_scheduler, make_searcher, tune_space
from clipray.sweep.trial import run_trial


def check_inputs(exp: Experiment, space: SearchSpace) -> None:
    """What the config alone can get wrong, found before anything is written or started."""
    known = result_keys(exp.eval, reference=exp.sweep.baseline)
    if exp.sweep.metric not in known:
        agg = sorted(k for k in known if k.startswith("agg/") and k.count("/") == 1)
        raise ConfigError(
            f"sweep.metric: {brief(exp.sweep.metric, 60)} is not a scoring result for these "
            f"corruptions and severities; e.g. {', '.join(agg)}, clean/rsum or "
            "corrupt/<name>/s<k>/rsum"
            + ("" if exp.sweep.baseline else " (agg/mce and relative_* need sweep.baseline)")
        )
    epoch_keys = [f"val/{k}" for k in retrieval_keys()]
    if exp.sweep.asha.enabled and exp.sweep.asha.metric not in epoch_keys:
        raise ConfigError(
            f"sweep.asha.metric: {brief(exp.sweep.asha.metric, 60)} is not a per-epoch metric "
            f"(higher is better); one of {', '.join(epoch_keys)}"
        )
    make_searcher(exp, space)  # the sampler's own constraints (grid: choice params only)
    cache = resolve_cache_dir(exp)  # remote storage needs an explicit eval.cache_dir
    if not os.environ.get("RAY_ADDRESS"):  # built on this machine: it must be possible here
        check_output_dir(cache, "eval.cache_dir" if exp.eval.cache_dir else "storage")
    check_dataset(exp, largest_batch(exp, space))  # every trial would fail on bad data
    check_ray_address()  # an unreachable cluster fails here, in seconds, not in ray.init


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
    check_storage_reach(exp)  # a node-local path on several nodes: refused before any write
    plan = plan or start_plan(exp, space)
    runs = plan.tracking.runs()
    runs.set_running(runs.parent)  # again, on a resume
    seeds = f" x {exp.sweep.seeds} paired seeds" if exp.sweep.seeds > 1 else ""
    out(
        f"sweep {plan.sweep_id}: {exp.sweep.num_samples} trials{seeds}, results in {plan.directory}"
    )
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
        storage_failure(plan.directory, raise_it=True)  # (trials that failed for want of it)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        with contextlib.suppress(Exception):  # the store may sit on the storage that failed
            runs.finish(runs.parent, status="KILLED" if interrupted else "FAILED")
        if not interrupted and (why := storage_failure(plan.directory)):
            raise StoppedError(why) from None  # one line, whatever Tune wrapped it in
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    # 4. Wrap up: baseline aggregates for early finishers, the best trial, the parent run.
    return _summarise(exp, plan, results, out)


def _tuner(exp: Experiment, space: SearchSpace, plan: Plan, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), {"CPU": exp.sweep.cpus_per_trial}
    )
    if resume and repair_tune_state(plan.directory):
        print("Tune's saved state was cut short (storage full?): resuming from its last whole copy")
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
            num_samples=exp.sweep.num_samples * exp.sweep.seeds,  # Tune trial: config x seed
            max_concurrent_trials=exp.sweep.max_concurrent_trials,
            reuse_actors=True,  # no trial is killed (ASHA stops are cooperative), so reuse
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=storage.absolute(exp.storage),
            callbacks=[
                StorageWatch(plan.directory),
                TuneStateBackup(plan.directory),
                RetireOrphans(plan.tracking),
                TrialLines(exp.sweep.metric),
                EpochsToMlflow(plan.tracking, exp.sweep.metric),
            ],
            failure_config=tune.FailureConfig(max_failures=1),
            progress_reporter=trial_table(exp, space),
            verbose=1,
        ),
    )


def _summarise(
    exp: Experiment, plan: Plan, results: Any, out: Callable[[str], None]
) -> SweepSummary:
    metric = exp.sweep.metric
    runs = plan.tracking.runs()
    scored = [r for r in results if r.metrics and metric in r.metrics]
    stopped = [r for r in results if r.metrics and r.metrics.get("early_stopped")]
    backfill_reference(runs, plan, scored)
    best = None
    if scored:
        best = max(scored, key=lambda r: r.metrics[metric] * (1 if exp.sweep.mode == "max" else -1))
        record_best(runs, exp, plan, best, len(scored))
    summary = SweepSummary(
        plan.sweep_id,
        plan.directory,
        len(scored) + len(stopped),
        best.metrics.get("trial_id") if best else None,
        best.metrics[metric] if best else None,
        best.metrics.get("checkpoint_path") if best else None,
        plan.tracking.uri,
        expected=exp.sweep.num_samples * exp.sweep.seeds,
        failed=results.num_errors,
    )
    table, csv_text = report(plan)
    storage.write_text(storage.join(plan.directory, REPORT), csv_text)
    out(table)
    report_at_end(plan, csv_text, out)  # report/ and the parent run's artifacts; never raises
    # Interrupted (Tune takes Ctrl-C and returns) or failed trials: the sweep is not finished.
    status = "FINISHED" if summary.complete else "FAILED" if summary.failed else "KILLED"
    runs.finish(runs.parent, status=status)
    for line in closing_lines(summary, metric):
        out(line)
    return summary
