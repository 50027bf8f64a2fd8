"""A sweep directory's manifest, ``<storage>/<name>/clipray_sweep.json``, and the :class:`Plan`.

The manifest records what a sweep is (id, resolved config, search space, MLflow ids) so that
``--resume`` refuses a changed config and continues the same MLflow runs, and ``clipray resume``
or ``clipray report`` work from the directory alone.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from clipray.config.errors import ConfigError
from clipray.config.loading import experiment_from_dict
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace, parse_space
from clipray.core import storage
from clipray.sweep.tracking import Tracking, flatten, open_sweep, prepare_backend, resolve_uri

MANIFEST = "clipray_sweep.json"


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
    or for a resume (the saved plan). Writes only a probe file and the tracking schema."""
    directory = sweep_directory(exp)
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
        if not same or saved["space"] != space_dict(space):
            raise ConfigError(f"{directory}: that sweep was run with a different config or space")
        return _plan(saved, directory)
    if resume:
        raise ConfigError(f"{directory}: not a clipray sweep (no {MANIFEST}); nothing to resume")
    prepare_backend(resolve_uri(exp))
    return None


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
    saved = storage.read_json(path)  # not JSON: a ValueError, reported as one line
    keys = ("sweep_id", "experiment", "space", "tracking")
    if not isinstance(saved, dict) or not all(k in saved for k in keys):
        raise ConfigError(f"{path}: not a clipray sweep manifest (needs {', '.join(keys)})")
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
    """The plan recorded in a sweep directory (``clipray report DIR``)."""
    directory, saved = _saved(directory)
    return _plan(saved, directory)
