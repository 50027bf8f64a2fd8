"""The one place that writes MLflow: one parent run per sweep, one child run per trial.

Runs are found again by tags (``clipray.sweep_id``, ``clipray.trial_id``), never by name or time,
so a resumed sweep continues its runs instead of creating new ones. Metric logging is idempotent:
a (key, step) already in a run's history is skipped, so replaying a result after a crash neither
repeats a point nor leaves a gap.

Only plain values travel: a :class:`Tracking` (uri, experiment id, parent run id) is a small
picklable record that trial processes and Ray Train callbacks rebuild a client from.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clipray import storage
from clipray.config import ConfigError, Experiment

SWEEP_TAG = "clipray.sweep_id"
TRIAL_TAG = "clipray.trial_id"
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


@dataclass(frozen=True)
class Tracking:
    """Where a sweep logs: picklable, shared with trial processes."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def get_or_create_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client: MlflowClient, experiment_id: str, tag: str, value: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=2
    )
    return runs[0].info.run_id if runs else None


def sweep_run(uri: str, experiment_id: str, sweep_id: str, name: str) -> str:
    """The sweep's parent run, created on first use and found by tag afterwards."""
    client = MlflowClient(uri)
    run_id = find_run(client, experiment_id, SWEEP_TAG, sweep_id)
    if run_id is None:
        tags = {SWEEP_TAG: sweep_id, "clipray.kind": "sweep", "clipray.git_commit": git_commit()}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    return run_id


def trial_run(tracking: Tracking, trial_id: str, name: str) -> str:
    """The trial's child run under the sweep's parent, never created twice."""
    client = tracking.client()
    run_id = find_run(client, tracking.experiment_id, TRIAL_TAG, trial_id)
    if run_id is None:
        tags = {TRIAL_TAG: trial_id, PARENT_TAG: tracking.parent_run_id, "clipray.kind": "trial"}
        run_id = client.create_run(tracking.experiment_id, run_name=name, tags=tags).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


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


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params once; values already there (a resumed run) are left alone."""
    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=new[start : start + 100])


def log_metrics(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, float],
    step: int,
    logged_steps: set[int] | None = None,
) -> bool:
    """Log ``metrics`` at ``step`` unless that step is already in the run; True if logged."""
    if logged_steps is None:
        logged_steps = metric_steps(client, run_id, next(iter(metrics)))
    if step in logged_steps:
        return False
    ts = _now_ms()
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
    for start in range(0, len(items), 1000):  # MLflow's per-batch metric limit
        client.log_batch(run_id, metrics=items[start : start + 1000])
    logged_steps.add(step)
    return True


def metric_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_artifacts(client: MlflowClient, run_id: str, files: Mapping[str, bytes | str]) -> None:
    """Write ``{relative name: content}`` as the run's artifacts (replacing earlier copies)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            else:
                path.write_bytes(content)
        client.log_artifacts(run_id, tmp)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """End a run as FINISHED, FAILED or KILLED (stopped early on purpose)."""
    RunStatus.from_string(status)  # validates the name
    client.set_terminated(run_id, status=status)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def runs_of_sweep(client: MlflowClient, tracking: Tracking) -> Iterable[Any]:
    return client.search_runs(
        [tracking.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracking.parent_run_id}'"
    )
