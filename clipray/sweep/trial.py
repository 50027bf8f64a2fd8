"""One sweep trial, run by Ray Tune in its trial process: train (a Ray Train run), score (the
sweep's actor pool), log (the trial's MLflow child run), report (to Tune and Optuna).

Everything a trial knows of its sweep travels in a :class:`Plan` of plain values, so a trial
re-run after a crash finds the same MLflow run, Train run and baseline as the first attempt.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import ray
import yaml
from ray import tune

from clipray.analysis.calibration import LOSSES
from clipray.analysis.results import arm_label
from clipray.config.loading import experiment_from_dict, with_values
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.scoring.plan import with_reference
from clipray.scoring.pool import ScorerPool
from clipray.scoring.tables import csv_table, heatmap_png, rsum_table
from clipray.sweep.manifest import Plan
from clipray.sweep.ray_train import make_trainer, read_checkpoint
from clipray.sweep.search import BASELINE_KEY, SEED_KEY, stop_marker_path
from clipray.sweep.tracking import ARM_TAG, Runs, flatten

BASELINE = "baseline_metrics.json"  # the epsilon = 0 trial's scores, in the sweep directory
RANKS = "ranks"  # <sweep>/ranks/<trial id>.npz: per-query ranks of every cell (paired bootstraps)


def baseline_file(base_seed: int, seed: int) -> str:
    """The baseline's scores for paired seed ``seed`` (the sweep's own seed: ``BASELINE``)."""
    return BASELINE if seed == base_seed else f"baseline_metrics-seed{seed}.json"


def trial_experiment(base: dict[str, Any], params: dict[str, Any]) -> Experiment:
    """The sweep's experiment with this trial's sampled values at their dotted paths."""
    values = {path: value for path, value in params.items() if path != BASELINE_KEY}  # seed too
    return experiment_from_dict(with_values(base, values), "trial config")


def run_trial(params: dict[str, Any], plan: Plan) -> None:
    """One Tune trial: train (Ray Train), score (the pool), log (MLflow), report (Tune)."""
    clock = {"start": time.time()}
    # 1. This trial's config and its MLflow child run (found again on resume, never duplicated).
    exp = trial_experiment(plan.experiment, params)
    trial_id = tune.get_context().get_trial_id()
    runs = plan.tracking.runs()
    run_id = runs.trial(trial_id, trial_label(trial_id, params))
    runs.log_params(run_id, {**flatten(exp.to_dict()), "trial_id": trial_id})
    runs.set_tags(run_id, {ARM_TAG: arm_label(params), "clipray.seed": str(exp.seed)})
    marker = stop_marker_path(plan.directory, trial_id)
    try:
        # 2. Train; a re-run of this trial continues from its own latest checkpoint.
        result = make_trainer(
            exp,
            name=trial_id,
            storage_path=storage.join(plan.directory, "train"),
            stop_marker=marker,
        ).fit()
        clock["fit"] = time.time()
        blob = read_checkpoint(result.checkpoint)  # (epoch metrics: the sweep driver logs them)
        report = _training_report(plan, trial_id, run_id, blob, result.checkpoint.path)
        checkpoint = report["checkpoint_path"]
        trained_all = report["epoch"] >= exp.train.epochs  # a late stop: score it all the same
        if storage.exists(marker) and not trained_all:  # no objective: Optuna records it pruned
            runs.set_tags(run_id, {"clipray.early_stopped": f"epoch {report['epoch']:g}"})
            runs.finish(run_id, status="KILLED")
            tune.report({**report, "early_stopped": 1.0})
            return
        # 3. Score the final weights on every corruption x severity with the shared pool.
        flat, ranks = ScorerPool.lookup(plan.pool_name).score_with_ranks(ray.put(blob))
        flat = _with_baseline(flat, plan, exp.seed, is_baseline=bool(params.get(BASELINE_KEY)))
        clock["score"] = time.time()
        # 4. Log the scores and artifacts; 5. report them to Tune (the objective among them).
        ranks_npz = npz_bytes(ranks)
        storage.write_bytes(storage.join(plan.directory, RANKS, f"{trial_id}.npz"), ranks_npz)
        _log_trial_artifacts(runs, run_id, exp, flat, checkpoint, trial_id, ranks_npz)
        clock["end"] = time.time()
        flat.update(timings(clock, blob["history"]))
        flat.update({k: report[k] for k in LOSSES if k in report})  # results.csv reads them here
        runs.log_metrics(run_id, flat, int(blob["step"]))  # once: a re-run after a crash skips
        runs.finish(run_id)
    except BaseException:
        runs.finish(run_id, status="FAILED")
        raise
    tune.report({**report, **flat})


def _training_report(
    plan: Plan, trial_id: str, run_id: str, blob: dict[str, Any], path: str
) -> dict[str, Any]:
    """What Tune hears of a finished training: its last checkpoint's metrics and where it is."""
    last = blob["history"][-1]  # the checkpoint's own entry
    return {
        **{k: v for k, v in last.items() if k.startswith(("val/", "train/"))},
        "step": blob["step"],
        "epoch": last["epoch"],  # step / steps per epoch, exact at an epoch's end
        "mlflow_run_id": run_id,
        # with its scheme (Checkpoint.path drops s3:// and the like)
        "checkpoint_path": storage.join(
            plan.directory, "train", trial_id, path.rstrip("/").rsplit("/")[-1]
        ),
    }


def timings(clock: dict[str, float], history: list[dict[str, float]]) -> dict[str, float]:
    """Where a trial's wall time went: orchestration overhead is what training and scoring
    do not explain (BENCHMARKS.md)."""
    trial = clock["end"] - clock["start"]
    steps = sum(h.get("time/steps_s", 0.0) for h in history)
    validate = sum(h.get("time/validate_s", 0.0) for h in history)
    score = clock["score"] - clock["fit"]
    out = {
        "trial_time/total_s": trial,
        "trial_time/fit_s": clock["fit"] - clock["start"],
        "trial_time/score_s": score,
        "trial_time/log_s": clock["end"] - clock["score"],
        "trial_time/train_steps_s": steps,
        "trial_time/validate_s": validate,
        "trial_time/overhead_s": trial - steps - validate - score,
    }
    starts = [
        h["time/first_step_at"] for h in history if h.get("time/first_step_at", 0) >= clock["start"]
    ]
    if starts:  # this attempt trained (a resumed, already trained trial does not)
        out["trial_time/to_first_step_s"] = min(starts) - clock["start"]
    return out


def trial_label(trial_id: str, params: dict[str, Any]) -> str:
    """The trial's MLflow run name: its id and what was sampled for it."""
    return f"{trial_id} {describe(params)}"


def describe(params: dict[str, Any]) -> str:
    """``baseline``, or the sampled values by their last name: ``epsilon=0.05, layer=2``; with
    paired seeds, the seed last: ``baseline, seed=1``."""
    seed = f"seed={params[SEED_KEY]}" if SEED_KEY in params else ""
    return ", ".join(p for p in (arm_label(params, digits=3), seed) if p)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of a compressed ``.npz``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _with_baseline(
    flat: dict[str, float], plan: Plan, seed: int, is_baseline: bool
) -> dict[str, float]:
    """Add mCE-style aggregates against the baseline of the same paired seed; the baseline
    trial publishes itself."""
    path = storage.join(plan.directory, baseline_file(plan.experiment["seed"], seed))
    if is_baseline and not storage.exists(path):
        storage.write_json(path, flat)
    if storage.exists(path):
        return with_reference(flat, storage.read_json(path))
    return flat  # the baseline has not finished yet; the sweep fills these in at its end


def _log_trial_artifacts(
    runs: Runs,
    run_id: str,
    exp: Experiment,
    flat: dict[str, float],
    checkpoint_path: str,
    trial_id: str,
    ranks_npz: bytes,
) -> None:
    runs.log_artifacts(
        run_id,
        {
            "query_ranks.npz": ranks_npz,
            "config.yaml": yaml.safe_dump(exp.to_dict(), sort_keys=False),
            "metrics.md": rsum_table(flat) + "\n",
            "metrics.csv": csv_table(flat),
            "rsum_heatmap.png": heatmap_png(flat, title=f"trial {trial_id}: retrieval RSUM"),
            "checkpoint.txt": checkpoint_path + "\n",
        },
    )
    runs.set_tags(run_id, {"clipray.checkpoint": checkpoint_path})
