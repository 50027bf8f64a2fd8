"""A sweep's results: every trial from its MLflow runs, the best trial, the closing lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from clipray.config.loading import experiment_from_dict
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.scoring.plan import with_reference
from clipray.scoring.tables import trials_csv, trials_table
from clipray.sweep.manifest import Plan
from clipray.sweep.tracking import Runs
from clipray.sweep.trial import BASELINE, trial_experiment

REPORT = "results.csv"  # every trial of the sweep, one row each, in the sweep directory
REPORT_METRICS = (
    ("clean rsum", "clean/rsum"),
    ("relative robustness", "agg/relative_robustness"),
    ("mCE", "agg/mce"),
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


def report(plan: Plan) -> tuple[str, str]:
    """Every trial of the sweep from its MLflow runs, best first: a markdown table for the
    console, and CSV (searched values and metrics at full precision) for analysis."""
    exp = experiment_from_dict(plan.experiment, "sweep manifest")
    metric, sign = exp.sweep.metric, 1 if exp.sweep.mode == "max" else -1
    metrics = list(dict.fromkeys([metric, *(k for _, k in REPORT_METRICS)]))
    rows = plan.tracking.runs().trial_rows(list(plan.space), metrics)
    rows.sort(key=lambda r: (r[metric] != r[metric], -sign * r[metric]))  # NaN (unscored) last
    columns = [("trial", "trial"), ("status", "status"), (metric, metric), *REPORT_METRICS]
    keys = ["trial_id", "trial", "status", *plan.space, *metrics]
    return trials_table(rows, columns), trials_csv(rows, keys)


def backfill_reference(runs: Runs, plan: Plan, scored: list) -> None:
    """Trials that finished before the baseline get their mCE-style aggregates now."""
    path = storage.join(plan.directory, BASELINE)
    if not storage.exists(path):
        return
    reference = storage.read_json(path)
    for r in scored:
        run_id = r.metrics["mlflow_run_id"]
        if "agg/mce" not in runs.metrics(run_id):
            extra = with_reference(r.metrics, reference)
            extra = {k: v for k, v in extra.items() if k not in r.metrics}
            runs.log_metrics(run_id, extra, int(r.metrics["step"]), set())


def record_best(runs: Runs, exp: Experiment, plan: Plan, best: Any, scored: int) -> None:
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
    runs.log_artifacts(
        runs.parent,
        {"best_config.yaml": config_yaml, "best_trial.json": json.dumps(record, indent=1)},
    )
    runs.set_tags(
        runs.parent,
        {"clipray.best_trial": record["trial_id"], "clipray.best_checkpoint": record["checkpoint"]},
    )
    best_metrics = {f"best/{metric}": best.metrics[metric], "trials_scored": scored}
    logged = runs.metric_steps(runs.parent, "trials_scored")
    runs.log_metrics(runs.parent, best_metrics, scored, logged)


def closing_lines(s: SweepSummary, metric: str) -> list[str]:
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
