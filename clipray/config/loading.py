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
from clipray.config.errors import ConfigError, brief, brief_text
from clipray.config.schema import DATA_KINDS, Experiment, data_kind

MAX_FILE_BYTES = 1 << 20  # an experiment or search-space file is a few KB; refuse megabytes
MAX_NODES = 100_000  # values in one parsed document, aliases expanded (a real config has ~100)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(brief_text(p, 60) for p in first["loc"] if p not in DATA_KINDS)  # no tags
    msg = brief_text(first["msg"].removeprefix("Value error, "), 300)
    if ": " in msg and msg.split(": ", 1)[0].count(".") >= 1:  # validator named the field itself
        loc, msg = msg.split(": ", 1)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "union_tag_invalid":
        kind = first["input"].get("kind") if isinstance(first["input"], dict) else first["input"]
        msg = f"unknown kind {brief(kind)}; expected one of {', '.join(DATA_KINDS)}"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {brief(first['input'])})"
    return f"{loc}: {msg}" if loc else msg


def _absolute(base: Path, value: str, field: str, source: str) -> Path:
    try:
        return (base / value).resolve()
    except (OSError, ValueError) as e:  # an embedded NUL byte, a symlink loop
        raise ConfigError(f"{source}: {field}: not a usable path {brief(value)} ({e})") from None


def is_uri(value: str) -> bool:
    """``s3://bucket/x``, ``gs://...``: a location that is not a local path (kept as given)."""
    return "://" in value


def _resolve_paths(raw: dict[str, Any], base: Path, source: str) -> None:
    """Make the data/space paths of a raw config absolute relative to the file's directory."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "val", "test", "image_root", "path"):
            if isinstance(data.get(key), str) and not is_uri(data[key]):
                data[key] = str(_absolute(base, data[key], f"data.{key}", source))
            elif isinstance(data.get(key), list):  # webdataset shard lists
                data[key] = [
                    str(_absolute(base, v, f"data.{key}", source))
                    if isinstance(v, str) and not is_uri(v)
                    else v
                    for v in data[key]
                ]
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str):
        candidate = _absolute(base, model["pretrained"], "model.pretrained", source)
        if candidate.is_file() or looks_like_file(model["pretrained"]):
            model["pretrained"] = str(candidate)
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("space"), str):
        sweep["space"] = str(_absolute(base, sweep["space"], "sweep.space", source))


# ------------------------------------------------------------------------------------ parsing
def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` whose every failure is one ConfigError naming ``source``.

    Anchors and aliases are shared by reference when parsed, but everything downstream (pydantic,
    copies, error messages) walks them expanded, so a document that expands past ``MAX_NODES``
    values (a "billion laughs" alias bomb, a self-referencing alias) is refused here, in time
    bounded by ``MAX_NODES``.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None)
        detail = f": {brief_text(problem, 80)}" if problem else ""
        raise ConfigError(f"{source}: not valid YAML{where}{detail}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    except Exception as e:  # a constructor's own error, e.g. an integer of 5000 digits
        raise ConfigError(f"{source}: not valid YAML ({brief_text(e, 80)})") from None
    _check_size(value, source)
    return value


def _check_size(value: Any, source: str) -> None:
    """Count values the way a walker meets them (aliases expanded); stop at ``MAX_NODES``."""
    stack, seen = [value], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_NODES} values (YAML aliases repeated or "
                "nested too much); expected a small config"
            )
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)


# ------------------------------------------------------------------------- dotted-path edits
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=v`` -> (["a", "b"], yaml-parsed v)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {brief(text)}: expected section.key=value")
    key = key.strip()
    return key.split("."), parse_yaml(value, f"--set {brief_text(key, 60)}") if value else None


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
def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """A small UTF-8 text file; one ConfigError naming it when it is missing, not a regular
    file, unreadable, larger than ``limit`` bytes or not UTF-8 (a binary file)."""
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit // 1024} KiB; expected a small YAML file")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not content
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "expected a YAML file"
        ) from None


def read_yaml(path: Path, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML file holding a mapping. An empty file (or only comments) is refused unless
    ``allow_empty`` (then ``{}``): an empty experiment would silently mean all defaults."""
    raw = parse_yaml(read_text(path), str(path))
    if raw is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{path}: empty file; expected a mapping of sections")
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
        _resolve_paths(raw, path.resolve().parent, str(path))
        source = str(path)
    over: dict[str, Any] = {}
    apply_overrides(over, overrides or [])
    _resolve_paths(over, Path.cwd(), "--set")
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
