"""Search spaces: distributions over dotted config paths, from ``search_spaces/*.yaml``.

A space file maps a config path to a distribution::

    perturb.layer:   {type: int, low: 0, high: 3}          # inclusive bounds
    perturb.epsilon: {type: loguniform, low: 0.01, high: 0.5}
    perturb.steps:   {type: choice, values: [1, 3]}
    perturb.tower:   {type: grid, values: [image, text]}   # every value, see clipray.sweep.search

Types: ``choice`` / ``grid`` (values), ``uniform`` / ``loguniform`` (low < high), ``int``
(low <= high, optional ``step``, ``log``). Each path must name a field of the experiment schema,
and every value a distribution can produce must be valid for that field. This module only parses
and validates; :mod:`clipray.sweep.search` turns a space into Ray Tune distributions.
"""

from __future__ import annotations

import itertools
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from clipray.config.errors import ConfigError, brief, brief_text
from clipray.config.loading import experiment_from_dict, read_yaml, with_values
from clipray.config.schema import Experiment


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Choice(_Dist):
    type: Literal["choice"]
    values: tuple[Any, ...] = Field(min_length=1)

    def extremes(self) -> list[Any]:
        return list(self.values)


class Grid(Choice):
    type: Literal["grid"]  # type: ignore[assignment]


class Uniform(_Dist):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"low ({self.low}) must be > 0 for a log scale")
        return self


class IntRange(_Dist):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("log needs low > 0 and step 1")
        return self

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


Distribution = Annotated[
    Choice | Grid | Uniform | LogUniform | IntRange, Field(discriminator="type")
]
_DIST = TypeAdapter(Distribution)
DIST_TYPES = ("choice", "grid", "uniform", "loguniform", "int")
MAX_COMBINATIONS = 512  # joint check of extremes: a few ms each, so well under a second


class SearchSpace(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    params: dict[str, Distribution]

    def check_against(self, exp: Experiment) -> None:
        """Every combination of extreme values must give a valid experiment.

        Combinations matter (a layer valid for the image tower may not exist in the text tower),
        so all of them are tried when there are at most ``MAX_COMBINATIONS``; beyond that, each
        parameter's extremes are tried on their own.
        """
        base = exp.to_dict()
        paths = list(self.params)
        extremes = [self.params[p].extremes() for p in paths]
        if math.prod(len(e) for e in extremes) <= MAX_COMBINATIONS:
            combos = itertools.product(*extremes)
            points = [dict(zip(paths, combo, strict=True)) for combo in combos]
        else:
            points = [{p: v} for p, values in zip(paths, extremes, strict=True) for v in values]
        for point in points:
            try:
                experiment_from_dict(with_values(base, point), self.source)
            except ConfigError as e:
                detail = str(e).split(": ", 1)[-1]
                values = brief_text(", ".join(f"{p}={brief(v, 40)}" for p, v in point.items()))
                raise ConfigError(f"{self.source}: {values} is invalid: {detail}") from None


def _field_exists(path: str) -> bool:
    """Whether ``a.b.c`` names a leaf field of the experiment schema (any data kind)."""
    models: list[Any] = [Experiment]
    for part in path.split("."):
        found = []
        for model in models:
            field = getattr(model, "model_fields", {}).get(part)
            if field is not None:
                found.extend(_models_in(field.annotation) or [None])
        if not found:
            return False
        models = found
    return None in models


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models an annotation can hold (through unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def parse_space(raw: dict[str, Any], source: str) -> SearchSpace:
    if not raw:
        raise ConfigError(f"{source}: empty search space; expected at least one parameter")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config paths to distributions")
    params = {}
    for key, spec in raw.items():
        path = brief_text(key, 80)
        if not isinstance(key, str) or not _field_exists(key):
            raise ConfigError(f"{source}: {path}: no such config field")
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{source}: {path}: expected a mapping with 'type' ({', '.join(DIST_TYPES)})"
            )
        try:
            params[key] = _DIST.validate_python(spec)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(brief_text(p, 40) for p in err["loc"][1:] if p not in DIST_TYPES)
            msg = brief_text(err["msg"].removeprefix("Value error, "), 200)
            if err["type"] == "union_tag_not_found":
                msg = f"missing 'type'; expected one of {', '.join(DIST_TYPES)}"
            elif err["type"] == "union_tag_invalid":
                kind = brief(spec.get("type"), 40)
                msg = f"unknown type {kind}; expected one of {', '.join(DIST_TYPES)}"
            elif "input" in err and not isinstance(err["input"], (dict, list, tuple)):
                msg = f"{msg} (got {brief(err['input'], 40)})"
            raise ConfigError(f"{source}: {path}{'.' + where if where else ''}: {msg}") from None
    return SearchSpace(source=source, params=params)


def load_space(path: str | Path, exp: Experiment | None = None) -> SearchSpace:
    """Parse and validate a space file; with ``exp``, also check every value against it."""
    path = Path(path)
    space = parse_space(read_yaml(path, allow_empty=True), str(path))
    space.check_against(exp if exp is not None else Experiment())
    return space


def largest_batch(exp: Experiment, space: SearchSpace | None) -> int:
    """The largest ``train.batch_size`` a trial of this sweep can get (the space may vary it)."""
    dist = space.params.get("train.batch_size") if space is not None else None
    if dist is None:
        return exp.train.batch_size
    return max(int(v) for v in dist.extremes())
