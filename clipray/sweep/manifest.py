"""A sweep directory's manifest, ``<storage>/<name>/clipray_sweep.json``, and the :class:`Plan`.

The manifest records what a sweep is (id, resolved config, search space, MLflow ids) so that
``--resume`` refuses a changed config and continues the same MLflow runs, and ``clipray resume``
or ``clipray report`` work from the directory alone.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from clipray.config.errors import ConfigError, brief_text
from clipray.config.loading import experiment_from_dict
from clipray.config.paths import check_output_dir, check_output_file
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace, parse_space
from clipray.core import storage
from clipray.sweep.tracking import Tracking, flatten, open_sweep, prepare_backend, resolve_uri

MANIFEST = "clipray_sweep.json"
TRACKING_FIELDS = tuple(f.name for f in fields(Tracking))


@dataclass(frozen=True)
class Plan:
    """Everything a trial needs to know about its sweep; plain values, picklable."""

    sweep_id: str
    directory: str  # <storage>/<name>, absolute or a URI
    experiment: dict[str, Any]
    space: dict[str, Any]
    tracking: Tracking

    @property
    def pool_name(self) -> str:
        return f"clipray-scorer-{self.sweep_id}"


def sweep_directory(exp: Experiment) -> str:
    return storage.join(storage.absolute(exp.storage), exp.name)


def space_dict(space: SearchSpace) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") for k, v in space.params.items()}


def check_destination(exp: Experiment, space: SearchSpace, resume: bool) -> Plan | None:
    """Storage writable, tracking reachable, and the sweep directory right for a new sweep (None)
    or for a resume (the saved plan). On local storage, leaves nothing behind until every check
    has passed; then, for a new sweep, writes the tracking schema (a local SQLite store)."""
    directory = sweep_directory(exp)
    uri = None if resume else resolve_uri(exp)  # config alone: remote storage needs a server
    _check_storage(storage.absolute(exp.storage))
    manifest = storage.join(directory, MANIFEST)
    if storage.exists(manifest):
        if not resume:
            raise ConfigError(
                f"{directory}: a sweep named {exp.name!r} is already there; resume it with "
                "--resume, or choose another name (--set name=...)"
            )
        saved = _read_manifest(manifest)
        same = _same_config(saved["experiment"], exp.to_dict())
        if not same or saved["space"] != space_dict(space):
            raise ConfigError(f"{directory}: that sweep was run with a different config or space")
        return _plan(saved, directory)
    if resume:
        raise ConfigError(f"{directory}: not a clipray sweep (no {MANIFEST}); nothing to resume")
    uri = uri or resolve_uri(exp)
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        check_output_file(uri.removeprefix("sqlite:///"), "tracking.uri")
    try:
        prepare_backend(uri)
    except ConfigError as e:  # MLflow's reasons can run to paragraphs
        raise ConfigError(brief_text(str(e), 300)) from None
    return None


def _check_storage(root: str) -> None:
    """Remote storage: created and probed. Local: probed, and left as it was (a missing directory
    is created to prove it can be, then removed), so a refused sweep leaves nothing behind."""
    if storage.is_remote(root):
        storage.check_writable(root, "storage")
    else:
        check_output_dir(root, "storage")


def start_plan(exp: Experiment, space: SearchSpace) -> Plan:
    """A new sweep: its MLflow parent run (config, space, commit) and the manifest."""
    sweep_id = f"{exp.name}-{uuid.uuid4().hex[:8]}"
    tracking = open_sweep(exp, sweep_id)
    plan = Plan(sweep_id, sweep_directory(exp), exp.to_dict(), space_dict(space), tracking)
    runs = tracking.runs()
    runs.log_params(runs.parent, {**flatten(exp.to_dict()), "sweep_id": sweep_id})
    runs.log_artifacts(
        runs.parent,
        {
            "config.yaml": yaml.safe_dump(exp.to_dict(), sort_keys=False),
            "search_space.yaml": yaml.safe_dump(plan.space, sort_keys=False),
        },
    )
    storage.write_json(
        storage.join(plan.directory, MANIFEST), {**asdict(plan), "tracking": asdict(tracking)}
    )
    return plan


def _read_manifest(path: str) -> dict[str, Any]:
    """The manifest at ``path``, with the shape every reader relies on; one line naming it
    when it is damaged (not JSON, not UTF-8, truncated, parts missing or of the wrong type)."""
    try:
        saved = storage.read_json(path)
    except (ValueError, OSError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else brief_text(e, 60)
        raise ConfigError(f"{path}: not a clipray sweep manifest (unreadable: {reason})") from None
    keys = ("sweep_id", "experiment", "space", "tracking")
    if not isinstance(saved, dict) or not all(k in saved for k in keys):
        raise ConfigError(f"{path}: not a clipray sweep manifest (needs {', '.join(keys)})")
    tracking = saved["tracking"]
    shape = {
        "sweep_id": isinstance(saved["sweep_id"], str),
        "experiment": isinstance(saved["experiment"], dict)
        and isinstance(saved["experiment"].get("name"), str),
        "space": isinstance(saved["space"], dict),
        "tracking": isinstance(tracking, dict)
        and sorted(tracking) == sorted(TRACKING_FIELDS)
        and all(isinstance(v, str) for v in tracking.values()),
    }
    bad = [key for key, ok in shape.items() if not ok]
    if bad:
        raise ConfigError(f"{path}: not a clipray sweep manifest (damaged: {', '.join(bad)})")
    return saved


def _same_config(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """The manifest's config is this one; where storage is (found there, so) aside."""
    return {**saved, "storage": None} == {**current, "storage": None}


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
    """The plan recorded in a sweep directory (``clipray report DIR``), its MLflow store still
    there: a local SQLite file that exists (MLflow would quietly create an empty one), a server
    that answers."""
    directory, saved = _saved(directory)
    uri = saved["tracking"]["uri"]
    where = storage.join(directory, MANIFEST)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{where}: the sweep's MLflow store {uri} is gone")
    if uri.startswith(("http://", "https://")):
        prepare_backend(uri)
    return _plan(saved, directory)
