"""The one module that talks to MLflow: one parent run per sweep, one child run per trial.

Runs are found again by tags (``clipray.sweep_id``, ``clipray.trial_id``), never by name or time,
so a resumed sweep continues its runs instead of creating new ones. Metric logging is idempotent:
a (key, step) already in a run's history is skipped, so replaying a result after a crash neither
repeats a point nor leaves a gap.

Only plain values travel: a :class:`Tracking` (uri, experiment id, parent run id) is a small
picklable record; :meth:`Tracking.runs` opens a :class:`Runs` session on it in any process. Callers
ask :class:`Runs` for what they need; no MLflow client leaves this module.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clipray.config.errors import ConfigError
from clipray.config.schema import Experiment
from clipray.core import storage

SWEEP_TAG = "clipray.sweep_id"
TRIAL_TAG = "clipray.trial_id"
ARM_TAG = "clipray.arm"  # the trial's configuration without its seed (paired seeds share it)
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def resolve_uri(exp: Experiment) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, else a SQLite file next to the sweep's results.

    Local stores come back absolute: Tune runs each trial in its own working directory.
    """
    uri = exp.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute_uri(uri)
    if storage.is_remote(exp.storage):
        raise ConfigError(
            f"tracking.uri: storage {exp.storage!r} is remote; set tracking.uri to an MLflow "
            "server (e.g. http://head-node:5000) so every node can log"
        )
    return f"sqlite:///{Path(storage.absolute(exp.storage)) / 'mlflow.db'}"


def _absolute_uri(uri: str) -> str:
    """``sqlite:///relative.db`` and plain directories made absolute; anything else as given."""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"
    if ":" not in uri:  # a file store directory
        return str(Path(uri).expanduser().resolve())
    return uri


def artifact_root(exp: Experiment, uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it; a server decides for itself."""
    if uri.startswith("sqlite:"):
        return (Path(storage.absolute(exp.storage)) / "mlartifacts").as_uri()
    return None


def prepare_backend(uri: str) -> None:
    """Create a SQLite schema once, up front, or check a server answers — before any trial."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
                r.read()
        except OSError as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                f"tracking.uri: MLflow server {uri} is unreachable ({reason})"
            ) from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        MlflowClient(uri).search_experiments(max_results=1)  # runs any schema migration now
    except (MlflowException, ImportError, OSError) as e:  # bad scheme, no DB driver, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"tracking.uri: cannot use {uri!r} ({first})") from None


def existing_store(uri: str) -> str:
    """``uri`` (absolute) of a store that is already there: a SQLite file that exists (MLflow
    would quietly create an empty one), a server that answers."""
    uri = _absolute_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri: no MLflow store at {uri}")
    prepare_backend(uri)
    return uri


@dataclass(frozen=True)
class Tracking:
    """Where a sweep logs: picklable, shared with trial processes."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def runs(self) -> Runs:
        return Runs(self)


def open_sweep(exp: Experiment, sweep_id: str) -> Tracking:
    """A new sweep's experiment (created on first use) and parent run (found again by tag)."""
    uri = resolve_uri(exp)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(exp.tracking.experiment)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(
            exp.tracking.experiment, artifact_location=artifact_root(exp, uri)
        )
    )
    run_id = _find_run(client, experiment_id, SWEEP_TAG, sweep_id)
    if run_id is None:
        tags = {SWEEP_TAG: sweep_id, "clipray.kind": "sweep", "clipray.git_commit": git_commit()}
        run_id = client.create_run(experiment_id, run_name=exp.name, tags=tags).info.run_id
    return Tracking(uri, experiment_id, run_id)


def find_sweep(uri: str, sweep: str) -> tuple[Tracking, str, list[str]]:
    """A sweep's parent run in any experiment of ``uri``, by sweep id or by name (the newest of
    that name): its Tracking, its sweep id, and the ids of older sweeps of the same name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", sweep):
        raise ConfigError(f"--sweep: {sweep[:60]!r} is not a sweep name or id")
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    kind = "tags.`clipray.kind` = 'sweep'"
    found = []
    for query in (f"tags.`{SWEEP_TAG}` = '{sweep}'", f"attributes.run_name = '{sweep}'"):
        if ids and not found:
            order = ["attributes.start_time DESC"]
            found = client.search_runs(ids, f"{kind} and {query}", order_by=order)
    if not found:
        raise ConfigError(f"--sweep: no sweep {sweep!r} in the MLflow store {uri}")
    run = found[0]
    tracking = Tracking(uri, run.info.experiment_id, run.info.run_id)
    return (
        tracking,
        run.data.tags.get(SWEEP_TAG, sweep),
        [r.data.tags.get(SWEEP_TAG, r.info.run_id) for r in found[1:]],
    )


def _find_run(client: MlflowClient, experiment_id: str, tag: str, value: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=2
    )
    return runs[0].info.run_id if runs else None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"perturb.epsilon": 0.1, ...}`` (lists as their string form)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Runs:
    """One process's session with a sweep's MLflow runs (the parent and its trials)."""

    def __init__(self, tracking: Tracking):
        self.tracking = tracking
        self._client = MlflowClient(tracking.uri)

    @property
    def parent(self) -> str:
        return self.tracking.parent_run_id

    def find_trial(self, trial_id: str) -> str | None:
        return _find_run(self._client, self.tracking.experiment_id, TRIAL_TAG, trial_id)

    def trial(self, trial_id: str, name: str) -> str:
        """The trial's child run under the sweep's parent, never created twice; RUNNING."""
        run_id = self.find_trial(trial_id)
        if run_id is None:
            tags = {TRIAL_TAG: trial_id, PARENT_TAG: self.parent, "clipray.kind": "trial"}
            run = self._client.create_run(self.tracking.experiment_id, run_name=name, tags=tags)
            return run.info.run_id
        self.set_running(run_id)
        return run_id

    def set_running(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed sweep or trial)."""
        self._client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run as FINISHED, FAILED or KILLED (stopped early on purpose)."""
        RunStatus.from_string(status)  # validates the name
        self._client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params once; values already there (a resumed run) are left alone."""
        existing = self._client.get_run(run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(run_id, params=new[start : start + 100])

    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        step: int,
        logged_steps: set[int] | None = None,
    ) -> bool:
        """Log ``metrics`` at ``step`` unless that step is already in the run; True if logged.

        ``logged_steps``: the steps known to be in the run (updated); None reads them."""
        if logged_steps is None:
            logged_steps = self.metric_steps(run_id, next(iter(metrics)))
        if step in logged_steps:
            return False
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
        for start in range(0, len(items), 1000):  # MLflow's per-batch metric limit
            self._client.log_batch(run_id, metrics=items[start : start + 1000])
        logged_steps.add(step)
        return True

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self._client.get_metric_history(run_id, key)}

    def metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self._client.get_run(run_id).data.metrics)

    def log_artifacts(self, run_id: str, files: Mapping[str, bytes | str]) -> None:
        """Write ``{relative name: content}`` as the run's artifacts (replacing earlier copies)."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, str):
                    path.write_text(content)
                else:
                    path.write_bytes(content)
            self._client.log_artifacts(run_id, tmp)

    def artifact_bytes(self, run_id: str, name: str) -> bytes | None:
        """The content of one of a run's artifacts; None when the run has no such file."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self._client.download_artifacts(run_id, name, dst_path=tmp)
            except (MlflowException, OSError):
                return None
            return Path(path).read_bytes() if Path(path).is_file() else None

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def retire_orphans(self, known_trials: set[str]) -> list[str]:
        """Soft-delete trial runs of this sweep whose trial Tune does not know.

        A driver killed between opening a trial's run and saving Tune's state leaves such a run,
        and so does Tune state put back from its last whole copy after a full disk: Tune then
        suggests that trial again under a new id. Deleted runs stay in the store (tagged
        ``clipray.orphaned``, restorable) but leave the sweep's views. Returns their ids.
        """
        mine = f"tags.`{PARENT_TAG}` = '{self.parent}'"
        retired = []
        for run in self._client.search_runs([self.tracking.experiment_id], filter_string=mine):
            if run.data.tags.get(TRIAL_TAG) not in known_trials:
                self.set_tags(run.info.run_id, {"clipray.orphaned": "not in Tune's saved state"})
                if run.info.status == "RUNNING":
                    self._client.set_terminated(run.info.run_id, status="KILLED")
                self._client.delete_run(run.info.run_id)
                retired.append(run.info.run_id)
        return retired

    def trial_rows(self, params: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
        """Every trial run of the sweep as a plain row: trial_id, trial (the run name), status,
        arm (its tag, "" when absent), the given params ("" when absent) and metrics (NaN when
        absent)."""
        runs = self._client.search_runs(
            [self.tracking.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent}'"
        )
        return [
            {
                "trial_id": run.data.tags.get(TRIAL_TAG, ""),
                "trial": run.info.run_name,
                "status": run.info.status,
                "arm": run.data.tags.get(ARM_TAG, ""),
                **{p: run.data.params.get(p, "") for p in params},
                **{k: run.data.metrics.get(k, float("nan")) for k in metrics},
            }
            for run in runs
        ]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
