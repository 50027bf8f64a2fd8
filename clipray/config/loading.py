"""Loading experiments: YAML files, ``--set a.b=v`` overrides, dotted-path edits, validation.

Paths inside a file are relative to that file; paths given with ``--set`` to the working
directory. Every failure is a :class:`ConfigError` whose message is one line naming the file and
the field. Dotted-path edits of plain config dicts (``--set``, a trial's sampled values, a search
space's extremes) all go through :func:`get_path` / :func:`set_path` / :func:`with_values`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clipray.config.architectures import looks_like_file
from clipray.config.errors import ConfigError
from clipray.config.schema import DATA_KINDS, Experiment, data_kind


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in DATA_KINDS)  # drop union tags
    msg = first["msg"].removeprefix("Value error, ")
    if ": " in msg and msg.split(": ", 1)[0].count(".") >= 1:  # validator named the field itself
        loc, msg = msg.split(": ", 1)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "union_tag_invalid":
        kind = first["input"].get("kind") if isinstance(first["input"], dict) else first["input"]
        msg = f"unknown kind {kind!r}; expected one of {', '.join(DATA_KINDS)}"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the data/space paths of a raw config absolute relative to the file's directory."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "val", "test", "image_root", "path"):
            if isinstance(data.get(key), str):
                data[key] = str((base / data[key]).resolve())
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str):
        candidate = base / model["pretrained"]
        if candidate.is_file() or looks_like_file(model["pretrained"]):
            model["pretrained"] = str(candidate.resolve())
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("space"), str):
        sweep["space"] = str((base / sweep["space"]).resolve())


# ------------------------------------------------------------------------- dotted-path edits
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=v`` -> (["a", "b"], yaml-parsed v)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    return key.strip().split("."), yaml.safe_load(value) if value else None


def get_path(raw: Mapping[str, Any], path: str) -> Any:
    """``raw[a][b][c]`` for ``path = "a.b.c"``."""
    node: Any = raw
    for part in path.split("."):
        node = node[part]
    return node


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """``raw[a][b][c] = value`` for ``path = [a, b, c]``, creating sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def with_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the plain config ``base`` with ``{"a.b": value}`` set at their paths."""
    raw = copy.deepcopy(dict(base))
    for path, value in values.items():
        set_path(raw, path.split("."), value)
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for text in overrides:
        set_path(raw, *parse_override(text))


# ---------------------------------------------------------------------------------- loading
def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def experiment_from_dict(raw: dict[str, Any], source: str = "config") -> Experiment:
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_error(e)}") from None
    except ValueError as e:  # raised outside pydantic's wrapping (e.g. nested validators)
        raise ConfigError(f"{source}: {e}") from None


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Load an experiment file (None: all defaults), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        raw = read_yaml(path)
        _resolve_paths(raw, path.resolve().parent)
        source = str(path)
    over: dict[str, Any] = {}
    apply_overrides(over, overrides or [])
    _resolve_paths(over, Path.cwd())
    _deep_merge(raw, over)
    return experiment_from_dict(raw, source)


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        old = dst.get(key)
        switches_kind = (  # a data section of another kind replaces the old one whole
            key == "data"
            and isinstance(value, dict)
            and isinstance(old, dict)
            and data_kind({"kind": data_kind(old), **value}) != data_kind(old)
        )
        if isinstance(value, dict) and isinstance(old, dict) and not switches_kind:
            _deep_merge(dst[key], value)
        else:
            dst[key] = value
