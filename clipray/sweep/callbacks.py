"""What the sweep driver does as Tune reports: epoch metrics to MLflow, a line per finished trial,
and the trial table's columns."""

from __future__ import annotations

import contextlib
import json
import pickle
from typing import Any

from ray import tune

from clipray.config.errors import StoppedError
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace
from clipray.core import storage
from clipray.sweep.ray_train import HISTORY_FILE
from clipray.sweep.search import BASELINE_KEY
from clipray.sweep.tracking import Runs, Tracking
from clipray.sweep.trial import describe


class EpochsToMlflow(tune.Callback):
    """Logs each trial's per-checkpoint metrics to its MLflow run, from the sweep driver only.

    Live, as each checkpoint is reported; at the trial's last report, any step a crash left out
    is filled in from the checkpoint's history. One writer, so no step is logged twice; steps a
    run already holds are skipped (a replay after a crash). The driver has MLflow loaded
    already, so logging costs training nothing.
    """

    KEYS = ("train/", "val/", "time/", "data/")  # data/: damaged samples skipped (streaming)

    def __init__(self, tracking: Tracking, objective: str):
        self.tracking, self.objective = tracking, objective
        self._runs: Runs | None = None
        self._trials: dict[str, tuple[str, set[int]]] = {}  # trial id -> (run id, logged steps)

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's state: no caches
        return {
            "tracking": self.tracking,
            "objective": self.objective,
            "_runs": None,
            "_trials": {},
        }

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "step" not in result:
            return
        if self._runs is None:
            self._runs = self.tracking.runs()
        runs = self._runs
        if trial.trial_id not in self._trials:
            run_id = runs.find_trial(trial.trial_id)
            if run_id is None:
                return
            self._trials[trial.trial_id] = (run_id, runs.metric_steps(run_id, "train/loss"))
        run_id, steps = self._trials[trial.trial_id]
        last = self.objective in result or result.get("early_stopped")
        history = checkpoint_history(result["checkpoint_path"]) if last else [result]
        for entry in history:
            metrics = {k: v for k, v in entry.items() if k.startswith(self.KEYS) or k == "epoch"}
            runs.log_metrics(run_id, metrics, int(entry["step"]), steps)


def checkpoint_history(checkpoint: str) -> list[dict[str, Any]]:
    """A trial checkpoint's per-checkpoint metrics (none from a checkpoint without the file)."""
    path = storage.join(checkpoint, HISTORY_FILE)
    return storage.read_json(path) if storage.exists(path) else []


class RetireOrphans(tune.Callback):
    """At the first step of a (resumed) sweep, retire MLflow trial runs Tune does not know.

    Tune hands every trial it knows, restored ones included, to ``on_step_begin`` before it
    starts any; a run still RUNNING under another trial id was opened by a driver that died
    before Tune saved that trial, which Tune will now suggest again under a new id.
    """

    def __init__(self, tracking: Tracking):
        self.tracking = tracking
        self._done = False

    def __getstate__(self) -> dict[str, Any]:  # a restored sweep checks again
        return {"tracking": self.tracking, "_done": False}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._done:
            self._done = True
            retired = self.tracking.runs().retire_orphans({t.trial_id for t in trials})
            if retired:
                print(f"retired {len(retired)} MLflow run(s) of trials lost in a crash", flush=True)


class StorageWatch(tune.Callback):
    """When a trial errors, check the sweep's storage can still be written; if not (full,
    read-only, gone), stop the sweep at once instead of failing every remaining trial."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        storage_failure(self.directory, raise_it=True)


TUNE_STATE = ("experiment_state-", "searcher-state-", "search_gen_state-")  # Tune's own files
BACKUP = ".tune-state-backup"  # the last complete copy of them, in the sweep directory


def _tune_state(directory: str) -> dict[str, bytes] | None:
    """Tune's saved state files of a sweep, or None if any is missing or cut short."""
    names = [n for n in storage.listdir(directory) if n.startswith(TUNE_STATE)]
    if not any(n.startswith(TUNE_STATE[0]) for n in names):
        return None
    files = {n: storage.read_bytes(storage.join(directory, n)) for n in names}
    return files if all(_whole(data) for data in files.values()) else None


def _whole(data: bytes) -> bool:
    """Whether a Tune state file parses: JSON, or a pickle (search_gen_state-*.json is one)."""
    for load in (json.loads, pickle.loads):
        try:
            load(data)
            return True
        except Exception:  # cut short, or the other format
            continue
    return False


def backup_tune_state(directory: str) -> None:
    """Copy Tune's state files aside when they are whole (each copy written atomically)."""
    files = _tune_state(directory)
    for name, data in (files or {}).items():
        storage.write_bytes(storage.join(directory, BACKUP, name), data)


def repair_tune_state(directory: str) -> bool:
    """Put the last whole copy of Tune's state back if the files in ``directory`` are damaged.

    Tune writes them in place; storage that filled up mid-write leaves them cut short, and
    ``Tuner.restore`` then silently starts the experiment over. Returns whether it repaired."""
    if _tune_state(directory) is not None:
        return False
    backup = storage.join(directory, BACKUP)
    saved = _tune_state(backup)
    if saved is None:
        return False
    for name in storage.listdir(directory):
        if name.startswith(TUNE_STATE):
            storage.remove(storage.join(directory, name))
    for name, data in saved.items():
        storage.write_bytes(storage.join(directory, name), data)
    return True


class TuneStateBackup(tune.Callback):
    """As each trial starts and ends, keep a whole copy of Tune's saved state (see repair)."""

    def __init__(self, directory: str):
        self.directory = directory

    def _backup(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # storage trouble: StorageWatch's job
            backup_tune_state(self.directory)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._backup()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._backup()


def storage_failure(directory: str, raise_it: bool = False) -> str | None:
    """Why ``directory`` cannot be written to now, or None; with ``raise_it``, a StoppedError."""
    try:
        storage.check_writable(directory, "storage")
    except ValueError as e:
        message = (
            f"{e}; what the sweep wrote before is kept: once the storage is writable again, "
            f"continue it with: clipray resume {directory}"
        )
        if raise_it:
            raise StoppedError(message) from None
        return message
    return None


class TrialLines(tune.Callback):
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


def trial_table(exp: Experiment, space: SearchSpace) -> tune.CLIReporter:
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
