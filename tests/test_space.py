"""Search spaces: distributions over dotted config paths, each path and value checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment
from clipray.config.space import (
    DIST_TYPES,
    Choice,
    Grid,
    IntRange,
    LogUniform,
    Uniform,
    _field_exists,
    load_space,
    parse_space,
)
from tests.test_config import leaf_fields, section_paths

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
SHIPPED_SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ distributions
@pytest.mark.parametrize(
    ("spec", "cls", "fields"),
    [
        ({"type": "choice", "values": [1, 2, 3]}, Choice, {"values": (1, 2, 3)}),
        ({"type": "grid", "values": ["image", "text"]}, Grid, {"values": ("image", "text")}),
        ({"type": "uniform", "low": 0, "high": 0.5}, Uniform, {"low": 0.0, "high": 0.5}),
        ({"type": "loguniform", "low": 0.01, "high": 1}, LogUniform, {"low": 0.01, "high": 1.0}),
        ({"type": "int", "low": 0, "high": 3}, IntRange, {"step": 1, "log": False}),
        ({"type": "int", "low": 1, "high": 8, "log": True}, IntRange, {"log": True}),
        ({"type": "int", "low": 0, "high": 6, "step": 2}, IntRange, {"step": 2}),
        ({"type": "int", "low": 2, "high": 2}, IntRange, {"low": 2, "high": 2}),  # inclusive
    ],
    ids=lambda v: v["type"] if isinstance(v, dict) and "type" in v else "",
)
def test_every_distribution_type_parses(spec, cls, fields):
    path = "perturb.steps" if spec["type"] in ("int", "choice") else "perturb.epsilon"
    if spec["type"] == "grid":
        path = "perturb.tower"
    space = parse_space({path: spec}, "s.yaml")
    dist = space.params[path]
    assert type(dist) is cls
    for key, value in fields.items():
        assert getattr(dist, key) == value


def test_every_documented_type_is_accepted():
    assert set(DIST_TYPES) == {"choice", "grid", "uniform", "loguniform", "int"}


def test_grid_stays_distinct_from_choice():
    space = parse_space(
        {
            "perturb.tower": {"type": "grid", "values": ["image", "text"]},
            "perturb.norm": {"type": "choice", "values": ["linf", "l2"]},
        },
        "s.yaml",
    )
    assert type(space.params["perturb.tower"]) is Grid
    assert type(space.params["perturb.norm"]) is Choice


BAD_SPECS = [
    (
        "low-above-high",
        "perturb.epsilon",
        {"type": "uniform", "low": 0.5, "high": 0.1},
        "perturb.epsilon: low (0.5) must be below high (0.1)",
    ),
    (
        "low-equals-high",
        "perturb.epsilon",
        {"type": "uniform", "low": 0.1, "high": 0.1},
        "perturb.epsilon: low (0.1) must be below high (0.1)",
    ),
    (
        "int-low-above-high",
        "perturb.layer",
        {"type": "int", "low": 3, "high": 1},
        "perturb.layer: low (3) must not exceed high (1)",
    ),
    (
        "log-low-zero",
        "perturb.epsilon",
        {"type": "loguniform", "low": 0, "high": 1},
        "perturb.epsilon: low (0.0) must be > 0 for a log scale",
    ),
    (
        "log-above",
        "perturb.epsilon",
        {"type": "loguniform", "low": 2, "high": 1},
        "perturb.epsilon: low (2.0) must be below high (1.0)",
    ),
    (
        "int-log-zero",
        "perturb.steps",
        {"type": "int", "low": 0, "high": 3, "log": True},
        "perturb.steps: log needs low > 0 and step 1",
    ),
    (
        "int-step-zero",
        "perturb.steps",
        {"type": "int", "low": 0, "high": 3, "step": 0},
        "perturb.steps.step: ",
    ),
    (
        "int-fraction",
        "perturb.steps",
        {"type": "int", "low": 0.5, "high": 3},
        "perturb.steps.low: ",
    ),
    ("empty-choice", "perturb.steps", {"type": "choice", "values": []}, "perturb.steps.values: "),
    ("choice-scalar", "perturb.steps", {"type": "choice", "values": 3}, "perturb.steps.values: "),
    (
        "unknown-type",
        "perturb.steps",
        {"type": "normal", "low": 0, "high": 1},
        "perturb.steps: unknown type 'normal'; expected one of choice, grid, uniform, loguniform, "
        "int",
    ),
    (
        "extra-key",
        "perturb.epsilon",
        {"type": "uniform", "low": 0, "high": 1, "q": 0.1},
        "perturb.epsilon.q: ",
    ),
    (
        "missing-high",
        "perturb.epsilon",
        {"type": "uniform", "low": 0},
        "perturb.epsilon.high: Field required",
    ),
    (
        "not-a-mapping",
        "perturb.steps",
        3,
        "perturb.steps: expected a mapping with 'type' (choice, grid, uniform, loguniform, int)",
    ),
    (
        "no-such-field",
        "perturb.strength",
        {"type": "uniform", "low": 0, "high": 1},
        "perturb.strength: no such config field",
    ),
]


@pytest.mark.parametrize(
    ("path", "spec", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_distributions_fail_with_one_line_naming_the_path(path, spec, expected):
    with pytest.raises(ConfigError) as err:
        parse_space({path: spec}, "s.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"s.yaml: {expected}")


def test_a_missing_type_says_so():
    with pytest.raises(ConfigError) as err:
        parse_space({"perturb.steps": {"low": 0, "high": 3}}, "s.yaml")
    assert str(err.value).startswith("s.yaml: perturb.steps")
    assert "type" in str(err.value)


def test_an_empty_space_is_an_error():
    with pytest.raises(ConfigError, match=r"^s\.yaml: empty search space"):
        parse_space({}, "s.yaml")


def test_a_space_is_frozen():
    space = parse_space({"perturb.steps": {"type": "choice", "values": [1]}}, "s.yaml")
    with pytest.raises(ValidationError):
        space.source = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        space.params["perturb.steps"].values = (2,)  # type: ignore[misc]


# ---------------------------------------------------------------------------- field existence
@pytest.mark.parametrize("path", sorted(leaf_fields()), ids=str)
def test_every_leaf_field_of_the_schema_can_be_searched(path):
    assert _field_exists(path)


@pytest.mark.parametrize(
    "path",
    [
        *[s for s in section_paths() if s],  # sections are not values
        "perturb.active",  # a property, not a field
        "perturb.resolved_step_size",
        "perturb.eps",
        "perturb.layer.x",
        "perturb.",
        ".perturb.layer",
        "",
        "layer",
        "eval.scorers",
        "eval.scorers.num_actor",
        "data.csv.train",  # the kind is not part of the path
    ],
)
def test_paths_that_are_not_fields_are_rejected(path):
    assert not _field_exists(path)
    with pytest.raises(ConfigError, match="no such config field"):
        parse_space({path: {"type": "choice", "values": [1]}}, "s.yaml")


# -------------------------------------------------------------------- values against the schema
@pytest.mark.parametrize(
    ("path", "spec", "model", "ok"),
    [
        ("perturb.layer", {"type": "int", "low": 0, "high": 3}, "clipray-tiny-vit", True),
        ("perturb.layer", {"type": "int", "low": -4, "high": 3}, "clipray-tiny-vit", True),
        ("perturb.layer", {"type": "int", "low": 0, "high": 4}, "clipray-tiny-vit", False),
        ("perturb.layer", {"type": "int", "low": -5, "high": 0}, "clipray-tiny-vit", False),
        ("perturb.layer", {"type": "int", "low": 0, "high": 7}, "clipray-small-vit", True),
        ("perturb.epsilon", {"type": "uniform", "low": -0.1, "high": 0.5}, None, False),
        ("perturb.epsilon", {"type": "uniform", "low": 0.0, "high": 0.5}, None, True),
        ("perturb.steps", {"type": "choice", "values": [1, -1]}, None, False),
        ("perturb.tower", {"type": "grid", "values": ["image", "audio"]}, None, False),
        ("perturb.adv_weight", {"type": "uniform", "low": 0.5, "high": 1.5}, None, False),
        ("train.lr", {"type": "loguniform", "low": 1e-5, "high": 1e-2}, None, True),
        ("eval.severities", {"type": "choice", "values": [[1, 3], [6]]}, None, False),
        ("model.name", {"type": "choice", "values": ["clipray-tiny-rn", "ViT-B-32"]}, None, True),
        ("model.name", {"type": "choice", "values": ["clipray-tiny-rn", "nope"]}, None, False),
    ],
)
def test_every_extreme_value_is_checked_against_the_experiment(path, spec, model, ok):
    exp = load_experiment(None, [f"model.name={model}"] if model else [])
    space = parse_space({path: spec}, "s.yaml")
    if ok:
        space.check_against(exp)
        return
    with pytest.raises(ConfigError) as err:
        space.check_against(exp)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"s.yaml: {path}=")
    assert "is invalid" in message


def test_values_that_are_only_invalid_together_are_rejected():
    """layer 7 is fine on the 8-block image tower but not on the 4-block text tower: a space
    searching both would send trials that crash at start, so loading it must fail."""
    exp = load_experiment(None, ["model.name=clipray-small-vit"])
    space = parse_space(
        {
            "perturb.layer": {"type": "int", "low": 0, "high": 7},
            "perturb.tower": {"type": "choice", "values": ["image", "text"]},
        },
        "s.yaml",
    )
    with pytest.raises(ConfigError, match="perturb.layer"):
        space.check_against(exp)


# --------------------------------------------------------------------------------------- files
def test_load_space_reads_and_checks_a_file(tmp_path):
    f = _write(
        tmp_path / "s.yaml",
        "perturb.layer: {type: int, low: 0, high: 3}\n"
        "perturb.steps: {type: choice, values: [1, 2]}\n",
    )
    space = load_space(f)
    assert list(space.params) == ["perturb.layer", "perturb.steps"]
    assert space.source == str(f)
    bad = _write(tmp_path / "b.yaml", "perturb.layer: {type: int, low: 0, high: 9}\n")
    with pytest.raises(ConfigError, match=r"perturb\.layer=9 is invalid"):
        load_space(bad)  # the default experiment's 4-block tower
    load_space(bad, load_experiment(None, ["model.name=RN50"]))  # 16 blocks: fine


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty search space"),
        ("# only a comment\n", "empty search space"),
        ("[1, 2]\n", "expected a mapping"),
        ("a: {\n", "not valid YAML"),
    ],
)
def test_bad_space_files_are_one_line(tmp_path, text, expected):
    f = _write(tmp_path / "s.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_space(f)
    assert str(err.value).startswith(f"{f}: {expected}")
    with pytest.raises(ConfigError, match="file not found"):
        load_space(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: p.name)
def test_shipped_spaces_are_valid_for_the_default_experiment(path):
    assert load_space(path).params


@pytest.mark.parametrize("sweep", SHIPPED_SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_reference_a_shipped_space_valid_for_them(sweep):
    exp = load_experiment(sweep)
    assert exp.sweep.space is not None, f"{sweep.name} names no search space"
    assert exp.sweep.space.resolve() in [p.resolve() for p in SHIPPED_SPACES]
    assert load_space(exp.sweep.space, exp).params


def test_the_default_experiment_is_valid():
    assert Experiment().model.name == "clipray-tiny-vit"
