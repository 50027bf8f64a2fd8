"""A sweep's results: every trial from its MLflow runs (results.csv), the best trial, the report
(:mod:`clipray.analysis`: statistics, plots, Markdown and HTML) and the closing lines."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from clipray.analysis.calibration import LOSSES
from clipray.analysis.results import (
    EPSILON,
    SEED,
    arm_label,
    finished,
    parse_value,
    read_ranks,
    read_results_csv,
)
from clipray.analysis.study_report import Report, SweepInputs, build_report
from clipray.config.errors import ConfigError, brief_text
from clipray.config.loading import experiment_from_dict
from clipray.config.paths import check_output_dir
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.core.data import load_split
from clipray.scoring.plan import OWNERS, result_keys, with_reference
from clipray.scoring.tables import trials_csv, trials_table
from clipray.sweep.manifest import Plan
from clipray.sweep.tracking import Runs, existing_store, find_sweep
from clipray.sweep.trial import baseline_file, trial_experiment

REPORT = "results.csv"  # every trial of the sweep, one row each, in the sweep directory
REPORT_DIR = "report"  # <sweep dir>/report/: report.md, report.html and their PNGs
RANKS_DIR = "ranks"  # <sweep dir>/ranks/<trial id>.npz: per-query ranks of each scored trial
RANKS_ARTIFACT = "query_ranks.npz"  # the same, on the trial's MLflow run
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


def result_columns(exp: Experiment) -> list[str]:
    """The metrics of results.csv: the objective, clean RSUM, the one-level aggregates, the
    RSUM of every corruption x severity cell, and the final epoch's clean and perturbed
    training losses (the calibration's loss gap; NaN for the baseline and older sweeps)."""
    keys = result_keys(exp.eval, reference=exp.sweep.baseline)
    keep = [
        k
        for k in keys
        if k == "clean/rsum"
        or (k.startswith("agg/") and k.count("/") == 1)
        or (k.startswith("corrupt/") and k.endswith("/rsum"))
    ]
    return list(dict.fromkeys([exp.sweep.metric, *(k for _, k in REPORT_METRICS), *keep, *LOSSES]))


def report(plan: Plan) -> tuple[str, str]:
    """Every trial of the sweep from its MLflow runs, best first: a markdown table for the
    console, and CSV (arm, seed, searched values and metrics at full precision) for analysis."""
    exp = experiment_from_dict(plan.experiment, "sweep manifest")
    metric, sign = exp.sweep.metric, 1 if exp.sweep.mode == "max" else -1
    metrics = result_columns(exp)
    named = list(dict.fromkeys([*plan.space, EPSILON]))  # what an arm is (epsilon 0: baseline)
    rows = plan.tracking.runs().trial_rows(list(dict.fromkeys([*named, SEED])), metrics)
    for row in rows:  # the trial's arm tag; derived for a sweep from before arms were tagged
        row["arm"] = row["arm"] or arm_label({k: parse_value(row[k]) for k in named})
    rows.sort(key=lambda r: (r[metric] != r[metric], -sign * r[metric]))  # NaN (unscored) last
    columns = [("trial", "trial"), ("status", "status"), (metric, metric), *REPORT_METRICS]
    keys = ["trial_id", "trial", "status", "arm", SEED, *plan.space, *metrics]
    return trials_table(rows, columns), trials_csv(rows, list(dict.fromkeys(keys)))


def backfill_reference(runs: Runs, plan: Plan, scored: list) -> None:
    """Trials that finished before their seed's baseline get their mCE-style aggregates now."""
    base_seed = plan.experiment["seed"]
    for r in scored:
        path = storage.join(
            plan.directory, baseline_file(base_seed, r.config.get("seed", base_seed))
        )
        if not storage.exists(path):
            continue
        reference = storage.read_json(path)
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


def study_inputs(
    plan: Plan, csv_text: str, runs: Runs | None, local_ranks: bool = True
) -> SweepInputs:
    """What the report is made of: results.csv's rows, and each finished trial's per-query
    ranks from ``ranks/<trial id>.npz`` in the sweep directory, else from its MLflow run."""
    rows = read_results_csv(csv_text)
    ranks, notes = {}, []
    for row in rows:
        trial_id = str(row["trial_id"])
        if finished(row):
            found = _trial_ranks(plan, trial_id, runs, local_ranks, notes)
            if found is not None:
                ranks[trial_id] = found
    _add_caption_owners(plan, ranks, notes)
    sweep = plan.experiment.get("sweep", {})
    source = plan.directory if local_ranks else plan.tracking.uri
    metric, mode = sweep.get("metric", SweepInputs.metric), sweep.get("mode", SweepInputs.mode)
    fixed = {f"perturb.{k}": v for k, v in plan.experiment.get("perturb", {}).items()}
    return SweepInputs(
        plan.sweep_id, source, rows, ranks, plan.space, metric, mode, tuple(notes), fixed
    )


def _add_caption_owners(plan: Plan, ranks: dict[str, dict], notes: list[str]) -> None:
    """Ranks saved before trials kept each caption's image get it from the sweep's eval split
    (the same for every trial), so the bootstrap draws a caption with its image."""
    if all(OWNERS in r for r in ranks.values()):
        return
    try:
        exp = experiment_from_dict(plan.experiment, "sweep manifest")
        split = load_split(exp.data, exp.eval.split).subset(exp.eval.max_images)
        owners = split.flat_captions()[1].numpy().astype(np.int32)
    except Exception as e:  # the eval data may be gone by now; captions are then drawn alone
        notes.append(f"each caption's image unknown ({brief_text(e, 80)}): drawn on their own")
        return
    for r in ranks.values():
        r.setdefault(OWNERS, owners)


def _trial_ranks(
    plan: Plan, trial_id: str, runs: Runs | None, local: bool, notes: list[str]
) -> dict[str, Any] | None:
    path = storage.join(plan.directory, RANKS_DIR, f"{trial_id}.npz")
    data, where = None, path
    if local and storage.exists(path):
        data = storage.read_bytes(path)
    elif runs is not None and (run_id := runs.find_trial(trial_id)):
        data, where = runs.artifact_bytes(run_id, RANKS_ARTIFACT), f"MLflow run {run_id}"
    if data is None:
        return None
    try:
        return read_ranks(data)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        notes.append(f"trial {trial_id}: its ranks ({where}) cannot be read ({brief_text(e, 80)})")
        return None


def write_study_report(
    plan: Plan,
    csv_text: str,
    out_dir: str | None = None,
    runs: Runs | None = None,
    local_ranks: bool = True,
) -> tuple[str, Report]:
    """report.md, report.html and the PNGs into ``out_dir`` (default ``<sweep dir>/report``)
    and, given ``runs``, onto the sweep's MLflow parent run (``report/``, with results.csv)."""
    out = out_dir or storage.join(plan.directory, REPORT_DIR)
    if not storage.is_remote(out):
        check_output_dir(out, "report")  # before any work
    built = build_report(study_inputs(plan, csv_text, runs, local_ranks))
    for name, content in built.files().items():
        if isinstance(content, str):
            storage.write_text(storage.join(out, name), content)
        else:
            storage.write_bytes(storage.join(out, name), content)
    if runs is not None:
        files = {f"{REPORT_DIR}/{name}": content for name, content in built.files().items()}
        runs.log_artifacts(runs.parent, {**files, REPORT: csv_text})
    return out, built


def report_at_end(plan: Plan, csv_text: str, out: Callable[[str], None]) -> None:
    """The finished sweep's report, beside results.csv and on its parent run. Never raises: a
    report that fails leaves the sweep as it was and says why in one line."""
    try:
        where, built = write_study_report(plan, csv_text, runs=plan.tracking.runs())
    except Exception as e:  # whatever it is, the sweep's own result stands
        out(f"report not written: {type(e).__name__}: {brief_text(e, 200)}")
        return
    out(f"report: {storage.join(where, 'report.html')} (and report.md)")
    for note in built.notes:
        out(f"report: {note}")


def plan_from_mlflow(uri: str, sweep: str) -> tuple[Plan, list[str]]:
    """The plan of a sweep found in an MLflow store by id or name (its parent run's config.yaml
    and search_space.yaml), without its directory; and the ids of older sweeps of that name."""
    uri = existing_store(uri)
    tracking, sweep_id, older = find_sweep(uri, sweep)
    runs = tracking.runs()
    saved = {}
    for name in ("config.yaml", "search_space.yaml"):
        data = runs.artifact_bytes(tracking.parent_run_id, name)
        if data is None:
            raise ConfigError(f"--sweep: the sweep {sweep_id}'s MLflow run has no {name}")
        saved[name] = yaml.safe_load(data)
    experiment = saved["config.yaml"]
    directory = storage.join(str(experiment.get("storage", ".")), str(experiment.get("name")))
    return Plan(sweep_id, directory, experiment, saved["search_space.yaml"], tracking), older
