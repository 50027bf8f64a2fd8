"""Experiment configuration: sections, frozen models, unknown keys, --set, paths, errors."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from clipray.config.errors import ConfigError
from clipray.config.loading import experiment_from_dict, load_experiment, parse_override
from clipray.config.schema import CsvData, Experiment, PerturbConfig, SyntheticData, check_layer
from tests.conftest import small_experiment

SECTIONS = ("data", "model", "perturb", "train", "eval", "tracking", "sweep")
REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPACE = REPO / "search_spaces" / "default.yaml"


# ------------------------------------------------------------------------------ schema helpers
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def leaf_fields(model: type[BaseModel] = Experiment, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the schema as ``dotted.path -> FieldInfo`` (all data kinds merged)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        models = _models_in(field.annotation)
        if models:
            for sub in models:
                out.update(leaf_fields(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def section_models(model: type[BaseModel] = Experiment) -> set[type[BaseModel]]:
    found = {model}
    for field in model.model_fields.values():
        for sub in _models_in(field.annotation):
            found |= section_models(sub)
    return found


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _csv_tables(folder: Path) -> None:
    """Two tiny real tables (the image files themselves are not needed to load a config)."""
    for name in ("train.csv", "val.csv"):
        _write(folder / name, "filepath,caption\na.png,a cat\n")


# ------------------------------------------------------------------------------------ sections
def test_an_experiment_has_exactly_the_documented_sections():
    assert set(Experiment.model_fields) == {"name", "seed", "storage", *SECTIONS}


def test_every_section_is_frozen_and_rejects_unknown_keys():
    for model in section_models():
        assert model.model_config.get("frozen") is True, model.__name__
        assert model.model_config.get("extra") == "forbid", model.__name__
    exp = Experiment()
    with pytest.raises(ValidationError, match="frozen"):
        exp.perturb.epsilon = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        exp.name = "other"  # type: ignore[misc]


def test_defaults_need_no_file_and_are_valid():
    assert load_experiment(None) == Experiment()
    assert isinstance(Experiment().data, SyntheticData)
    assert not Experiment().perturb.active  # the default is the clean baseline


def section_paths(model: type[BaseModel] = Experiment, prefix: str = "") -> list[str]:
    """Dotted paths of every section (the default data kind only; other kinds below)."""
    out = [prefix.rstrip(".")]
    for name, field in model.model_fields.items():
        for sub in _models_in(field.annotation)[:1]:
            out += section_paths(sub, f"{prefix}{name}.")
    return out


@pytest.mark.parametrize("section", section_paths(), ids=lambda s: s or "top")
def test_unknown_key_in_every_section_is_rejected_naming_it(section):
    key = f"{section}.no_such_key" if section else "no_such_key"
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [f"{key}=1"])
    assert str(err.value) == f"defaults: {key}: unknown key"


def test_unknown_data_key_is_rejected_for_the_chosen_kind(tmp_path):
    _csv_tables(tmp_path)
    f = _write(
        tmp_path / "e.yaml",
        "data: {kind: csv, train: train.csv, val: val.csv, train_size: 10}\n",
    )
    with pytest.raises(ConfigError, match=r"data\.train_size: unknown key"):
        load_experiment(f)


# ------------------------------------------------------------------------------------ overrides
def _changed_value(path: str, field: Any) -> Any:
    """A valid value different from the field's default, chosen from the field's type."""
    special = {
        "name": "other-name",
        "storage": "elsewhere",
        "model.name": "clipray-tiny-rn",
        "model.pretrained": str(Path(__file__).resolve()),  # any existing file passes the check
        "eval.corruptions": ["extra"],
        "eval.severities": [2, 4],
        "train.betas": [0.85, 0.95],
        "eval.cache_dir": "cache",
        "tracking.uri": "sqlite:///x.db",
        "tracking.experiment": "other",
        "sweep.space": str(SHIPPED_SPACE),
        "sweep.metric": "agg/other",
        "sweep.asha.metric": "val/other",
    }
    if path in special:
        return special[path]
    default = field.default
    args = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        return next(a for a in args if a != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 0.75 if default else 0.5
    if default is None and int in args:
        return 3
    if default is None and float in args:
        return 0.5
    raise AssertionError(f"no changed value for {path} ({field.annotation}); add it to special")


def _get(exp: Experiment, path: str) -> Any:
    node: Any = exp
    for part in path.split("."):
        node = getattr(node, part)
    return node


OVERRIDABLE = sorted(
    p
    for p in leaf_fields()
    if not p.startswith("data.")
    or p in {f"data.{k}" for k in SyntheticData.model_fields if k != "kind"}
)


@pytest.mark.parametrize("path", OVERRIDABLE, ids=str)
def test_set_overrides_any_field_with_a_yaml_value(path):
    value = _changed_value(path, leaf_fields()[path])
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
    exp = load_experiment(None, [f"{path}={text}"])
    got = _get(exp, path)
    expected = tuple(value) if isinstance(value, list) else value
    if isinstance(got, Path):
        got = str(got)
    assert got == expected
    assert got != _get(Experiment(), path)


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("train.grad_clip=null", "train.grad_clip", None),
        ("train.grad_clip=", "train.grad_clip", None),
        ("perturb.random_start=no", "perturb.random_start", False),  # YAML 1.1 boolean
        ("perturb.epsilon=1.5e-1", "perturb.epsilon", 0.15),
        ("eval.severities=[1, 5]", "eval.severities", (1, 5)),
        ("eval.corruptions=[fog, snow]", "eval.corruptions", ("fog", "snow")),
        ("name='007'", "name", "007"),
        ("eval.scorers.num_actors=3", "eval.scorers.num_actors", 3),
        ("sweep.searcher.sampler=random", "sweep.searcher.sampler", "random"),
        ("train.lr = 0.01", "train.lr", 0.01),
    ],
)
def test_set_values_are_parsed_as_yaml(override, path, expected):
    assert _get(load_experiment(None, [override]), path) == expected


def test_later_overrides_win_and_file_values_are_overridden(tmp_path):
    f = _write(tmp_path / "e.yaml", "perturb: {epsilon: 0.1, steps: 2}\ntrain: {epochs: 5}\n")
    exp = load_experiment(f, ["perturb.epsilon=0.2", "perturb.epsilon=0.3"])
    assert exp.perturb.epsilon == 0.3
    assert exp.perturb.steps == 2 and exp.train.epochs == 5  # siblings from the file survive


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("perturb.layer", "--set 'perturb.layer': expected section.key=value"),
        ("=3", "--set '=3': expected section.key=value"),
    ],
)
def test_malformed_set_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [override])
    assert str(err.value) == message


def test_parse_override_splits_the_path_and_parses_the_value():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_setting_a_section_to_a_scalar_names_the_section():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["perturb=3"])
    assert str(err.value).startswith("defaults: perturb: ")


def test_switching_data_kind_by_set_drops_the_other_kinds_keys(tmp_path):
    _csv_tables(tmp_path)
    exp = load_experiment(
        REPO / "sweeps" / "default.yaml",  # its data section is synthetic with sizes
        ["data.kind=csv", f"data.train={tmp_path / 'train.csv'}", f"data.val={tmp_path}/val.csv"],
    )
    assert isinstance(exp.data, CsvData)
    assert exp.data.train == tmp_path / "train.csv"


def test_setting_the_implicit_data_kind_keeps_the_files_data_settings(tmp_path):
    """A data section without ``kind`` is synthetic; saying so explicitly must change nothing."""
    f = _write(tmp_path / "e.yaml", "data: {train_size: 100, image_size: 32}\n")
    assert load_experiment(f).data.train_size == 100
    exp = load_experiment(f, ["data.kind=synthetic"])
    assert (exp.data.train_size, exp.data.image_size) == (100, 32)


# ------------------------------------------------------------------------------------ paths
def test_paths_in_a_file_are_relative_to_that_file(tmp_path, monkeypatch):
    exp_dir = tmp_path / "project" / "sweeps"
    _csv_tables(exp_dir / "tables")
    (exp_dir / "images").mkdir()
    _write(exp_dir / "space.yaml", "perturb.layer: {type: int, low: 0, high: 1}\n")
    f = _write(
        exp_dir / "e.yaml",
        "data: {kind: csv, train: tables/train.csv, val: tables/val.csv, image_root: images}\n"
        "sweep: {space: space.yaml}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp = load_experiment(Path("..") / "project" / "sweeps" / "e.yaml")
    assert exp.data.train == exp_dir / "tables" / "train.csv"
    assert exp.data.val == exp_dir / "tables" / "val.csv"
    assert exp.data.image_root == exp_dir / "images"
    assert exp.sweep.space == exp_dir / "space.yaml"
    assert all(p.is_absolute() for p in (exp.data.train, exp.data.val, exp.sweep.space))
    assert load_experiment(f) == exp  # the same file by another name resolves the same


def test_karpathy_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    _write(tmp_path / "d" / "dataset.json", '{"images": []}')
    (tmp_path / "d" / "img").mkdir()
    f = _write(
        tmp_path / "d" / "e.yaml", "data: {kind: karpathy, path: dataset.json, image_root: img}\n"
    )
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(f)
    assert exp.data.path == tmp_path / "d" / "dataset.json"
    assert exp.data.image_root == tmp_path / "d" / "img"


def test_paths_given_with_set_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    _csv_tables(tmp_path / "here")
    f = _write(tmp_path / "sweeps" / "e.yaml", "seed: 1\n")
    monkeypatch.chdir(tmp_path / "here")
    exp = load_experiment(f, ["data.kind=csv", "data.train=train.csv", "data.val=val.csv"])
    assert exp.data.train == tmp_path / "here" / "train.csv"


def test_a_pretrained_checkpoint_path_in_a_file_is_relative_to_that_file(tmp_path, monkeypatch):
    """``model.pretrained`` may be a file; like every path in a file it is relative to the file
    (a Ray worker runs in another directory, so it must be resolved when the file is loaded)."""
    _write(tmp_path / "exp" / "weights.pt", "not read by the config layer")
    f = _write(tmp_path / "exp" / "e.yaml", "model: {pretrained: weights.pt}\n")
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(f)
    assert Path(exp.model.pretrained) == tmp_path / "exp" / "weights.pt"


# ------------------------------------------------------------------------------ round trip
def test_to_dict_is_json_and_round_trips(tmp_path):
    _csv_tables(tmp_path)
    for exp in (
        Experiment(),
        load_experiment(REPO / "sweeps" / "default.yaml"),
        load_experiment(
            None,
            [
                "data.kind=csv",
                f"data.train={tmp_path}/train.csv",
                f"data.val={tmp_path}/val.csv",
                "perturb.tower=both",
                "perturb.epsilon=0.1",
            ],
        ),
    ):
        d = exp.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert experiment_from_dict(d) == exp


# ------------------------------------------------------------------------------------ errors
BAD_FILES = [
    ("unknown-top", "colour: red\n", "colour: unknown key"),
    ("unknown-nested", "train: {epoch: 3}\n", "train.epoch: unknown key"),
    ("wrong-type", "train: {epochs: many}\n", "train.epochs: Input should be a valid integer"),
    ("negative-epsilon", "perturb: {epsilon: -0.1}\n", "perturb.epsilon: "),
    ("negative-steps", "perturb: {steps: -1}\n", "perturb.steps: "),
    ("layer-too-deep", "perturb: {layer: 4}\n", "perturb.layer: 4 is beyond the image tower"),
    ("layer-too-negative", "perturb: {tower: text, layer: -5}\n", "perturb.layer: -5 is beyond"),
    ("unknown-model", "model: {name: ViT-Nope}\n", "model.name: unknown model 'ViT-Nope'"),
    ("timm-model", "model: {name: convnext_base}\n", "model.name: 'convnext_base' uses a timm"),
    ("unknown-kind", "data: {kind: parquet}\n", "unknown kind 'parquet'"),
    ("missing-table", "data: {kind: csv, train: no.csv, val: no.csv}\n", "data.train: file not"),
    ("missing-json", "data: {kind: karpathy, path: no.json, image_root: .}\n", "data.path: file"),
    (
        "missing-root",
        "data: {kind: karpathy, path: e.yaml, image_root: nodir}\n",
        "data.image_root: directory not found",
    ),
    ("missing-field", "data: {kind: csv}\n", "data.train: Field required"),
    ("bad-corruption", "eval: {corruptions: [rain]}\n", "eval.corruptions: "),
    ("bad-severity", "eval: {severities: [0, 6]}\n", "eval.severities: expected"),
    ("no-severity", "eval: {severities: []}\n", "eval.severities: expected"),
    ("uneven-batch", "train: {batch_size: 10, num_workers: 3}\n", "train.batch_size: 10 does not"),
    ("bad-name", "name: ../escape\n", "name: String should match pattern"),
    ("bad-literal", "perturb: {norm: l3}\n", "perturb.norm: Input should be 'linf' or 'l2'"),
    ("section-scalar", "train: 3\n", "train: Input should be a valid dictionary"),
    ("not-yaml", "train: {epochs: [\n", "not valid YAML (line 2)"),
    ("top-level-list", "- train\n", "expected a mapping of sections at the top level"),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_files_fail_with_one_line_naming_file_and_field(tmp_path, text, expected):
    f = _write(tmp_path / "e.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_experiment(f)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{f}: ")
    assert expected in message
    if expected.endswith(": "):  # the field is named; say what was expected too
        assert "greater than or equal to 0" in message or "rain" in message


def test_the_data_kind_error_lists_the_known_kinds(tmp_path):
    f = _write(tmp_path / "e.yaml", "data: {kind: parquet}\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(f)
    assert "data" in str(err.value) and "synthetic, csv, karpathy" in str(err.value)


def test_a_missing_experiment_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(tmp_path / "nope.yaml")
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_an_empty_file_is_refused_rather_than_read_as_all_defaults(tmp_path):
    """No file means the defaults; an empty one (or only comments) is more likely a mistake."""
    f = _write(tmp_path / "e.yaml", "# nothing\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(f)
    assert str(err.value) == f"{f}: empty file; expected a mapping of sections"


# ------------------------------------------------------------------------------------ perturb
@pytest.mark.parametrize("tower", ["image", "text", "both"])
@pytest.mark.parametrize("depths", [{"image": 4, "text": 4}, {"image": 8, "text": 3}])
def test_layer_bounds_follow_python_indexing_of_the_tower_blocks(tower, depths):
    """Reference: a layer is valid iff indexing a list of the tower's blocks with it works."""
    towers = ("image", "text") if tower == "both" else (tower,)
    for layer in range(-10, 10):

        def indexable(depth: int, layer: int = layer) -> bool:
            try:
                list(range(depth))[layer]
            except IndexError:
                return False
            return True

        ok = all(indexable(depths[t]) for t in towers)
        cfg = PerturbConfig(tower=tower, layer=layer)
        if ok:
            check_layer(cfg, depths)
        else:
            with pytest.raises(ValueError, match=rf"^perturb\.layer: {layer} is beyond"):
                check_layer(cfg, depths)


def test_layer_bounds_use_the_chosen_model():
    assert (
        load_experiment(None, ["model.name=clipray-small-vit", "perturb.layer=7"]).perturb.layer
        == 7
    )
    with pytest.raises(ConfigError, match="perturb.layer"):
        load_experiment(None, ["model.name=clipray-tiny-vit", "perturb.layer=7"])


@pytest.mark.parametrize(
    ("epsilon", "steps", "active"),
    [(0.0, 0, False), (0.0, 3, False), (0.2, 0, False), (0.2, 1, True)],
)
def test_perturbation_is_active_only_with_epsilon_and_steps(epsilon, steps, active):
    assert PerturbConfig(epsilon=epsilon, steps=steps).active is active


def test_step_size_defaults_to_madrys_rule_and_can_be_set():
    assert PerturbConfig(epsilon=0.4, steps=5).resolved_step_size == pytest.approx(0.2)
    assert PerturbConfig(epsilon=0.4, steps=0).resolved_step_size == pytest.approx(1.0)
    assert PerturbConfig(epsilon=0.4, steps=5, step_size=0.01).resolved_step_size == 0.01
    with pytest.raises(ValidationError):
        PerturbConfig(step_size=0.0)


def test_use_gpu_takes_yaml_yes_and_no():
    assert small_experiment("train.use_gpu=yes").train.use_gpu == "yes"  # a YAML boolean
    assert small_experiment("train.use_gpu=no").train.use_gpu == "no"
    with pytest.raises(ConfigError, match="train.use_gpu"):
        small_experiment("train.use_gpu=1")
