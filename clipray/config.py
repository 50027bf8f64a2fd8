"""Experiment configuration: typed, validated once, then frozen.

An experiment file (``sweeps/*.yaml``) has one section per concern — ``data``, ``model``,
``perturb``, ``train``, ``eval``, ``tracking``, ``sweep`` — plus a ``name`` and a ``seed``. It is
loaded into the frozen pydantic models below; unknown keys are rejected. ``--set a.b=v`` overrides
any field (the value is parsed as YAML). Paths inside a file are relative to that file.

Every failure is a :class:`ConfigError` whose message is one line naming the file and the field.
Only plain dicts cross process boundaries: :meth:`Experiment.to_dict` and
:func:`experiment_from_dict`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------- data
class SyntheticData(_Section):
    """Captioned shapes generated from ``data_seed``; the built-in default."""

    kind: Literal["synthetic"] = "synthetic"
    train_size: int = Field(2048, ge=1, description="enough for a tiny model to learn in minutes")
    val_size: int = Field(256, ge=1, description="per-epoch clean recall; small so it is cheap")
    test_size: int = Field(256, ge=1, description="scored under every corruption")
    image_size: int = Field(64, ge=16, le=512, description="matches the tiny models' input size")
    captions_per_image: int = Field(2, ge=1, le=5, description="exercises multi-caption recall")
    max_shapes: int = Field(2, ge=1, le=4, description="1..max shapes per image")
    data_seed: int = Field(1234, description="the dataset itself; independent of training seed")


class CsvData(_Section):
    """Image–caption tables: one row per (image path, caption); an image may repeat."""

    kind: Literal["csv"] = "csv"
    train: Path
    val: Path
    test: Path | None = Field(None, description="defaults to the val table")
    image_root: Path | None = Field(None, description="image paths are relative to this")
    image_column: str = "filepath"
    caption_column: str = "caption"

    @model_validator(mode="after")
    def _files_exist(self) -> CsvData:
        for name in ("train", "val", "test"):
            _require_file(getattr(self, name), f"data.{name}")
        _require_dir(self.image_root, "data.image_root")
        return self


class KarpathyData(_Section):
    """A Karpathy-style ``dataset_*.json`` (Flickr30k, COCO) with its train/val/test split."""

    kind: Literal["karpathy"] = "karpathy"
    path: Path
    image_root: Path

    @model_validator(mode="after")
    def _files_exist(self) -> KarpathyData:
        _require_file(self.path, "data.path")
        _require_dir(self.image_root, "data.image_root")
        return self


def _require_file(path: Path | None, field: str) -> None:
    if path is not None and not path.is_file():
        raise ValueError(f"{field}: file not found: {path}")


def _require_dir(path: Path | None, field: str) -> None:
    if path is not None and not path.is_dir():
        raise ValueError(f"{field}: directory not found: {path}")


def _data_kind(value: Any) -> str | None:
    """The ``kind`` of a data section; omitted means the built-in synthetic dataset."""
    if isinstance(value, dict):
        return value.get("kind", "synthetic")
    return getattr(value, "kind", None)


DATA_KINDS = ("synthetic", "csv", "karpathy")
DataConfig = Annotated[
    Annotated[SyntheticData, Tag("synthetic")]
    | Annotated[CsvData, Tag("csv")]
    | Annotated[KarpathyData, Tag("karpathy")],
    Discriminator(_data_kind),
]


# --------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = Field("clipray-tiny-vit", description="open_clip architecture or bundled tiny one")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (must be cached locally) or a checkpoint file"
    )


# ------------------------------------------------------------------------------------- perturb
class PerturbConfig(_Section):
    """Feature-level PGD on the hidden states at the output of block ``layer``."""

    tower: Literal["image", "text", "both"] = "image"
    layer: int = Field(0, description="block index; negative counts from the end like Python")
    epsilon: float = Field(0.0, ge=0.0, description="0 means clean training (the baseline)")
    epsilon_mode: Literal["absolute", "relative"] = Field(
        "relative",
        description="relative: times the per-sample feature RMS, comparable across layers",
    )
    steps: int = Field(0, ge=0, description="PGD steps; 0 means clean training")
    step_size: float | None = Field(
        None, gt=0.0, description="None: 2.5 * epsilon / steps (Madry et al.'s rule of thumb)"
    )
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = Field(
        True, description="uniform start inside the ball, as in Madry et al."
    )
    adv_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="loss = (1 - w) * clean + w * adversarial"
    )

    @property
    def active(self) -> bool:
        """False when the perturbation is a no-op and training is exactly clean."""
        return self.epsilon > 0.0 and self.steps > 0

    @property
    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return 2.5 * self.epsilon / max(self.steps, 1)


# --------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=2, description="global batch; split evenly across workers")
    lr: float = Field(1e-3, gt=0.0, description="high enough for a tiny model to move in 2 epochs")
    weight_decay: float = Field(0.1, ge=0.0, description="CLIP's value")
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="max global grad norm; None: off")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    local_loss: bool = Field(False, description="open_clip's local loss: rows of this rank only")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per trial")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="None: at every epoch end only"
    )
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        """``use_gpu: yes`` is a YAML boolean; take it as the word it was written as."""
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


# ---------------------------------------------------------------------------------------- eval
class ScorerConfig(_Section):
    num_actors: int = Field(2, ge=1, description="one per core on this 2-core machine")
    cpus_per_actor: float = Field(
        0.5,
        gt=0.0,
        description="Ray's logical share; torch threads = ceil(cpus). Scoring runs "
        "between trainings, so the pool need not reserve whole cores",
    )
    gpus_per_actor: float = Field(0.0, ge=0.0)


class EvalConfig(_Section):
    split: Literal["val", "test"] = "test"
    corruptions: tuple[str, ...] = Field(
        ("common",), description="names or groups: common, extra, all"
    )
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    max_images: int | None = Field(None, ge=1, description="score on the first N images only")
    batch_size: int = Field(256, ge=1)
    seed: int = Field(0, description="corruption randomness; fixed so trials see the same images")
    cache_dir: str | None = Field(None, description="None: <storage>/cache (local storage)")
    scorers: ScorerConfig = ScorerConfig()

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        from clipray.corrupt import resolve_corruptions

        if not self.corruptions:
            raise ValueError("eval.corruptions: expected at least one corruption name or group")
        try:
            resolve_corruptions(self.corruptions)
        except ValueError as e:
            raise ValueError(f"eval.corruptions: {e}") from None
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad or not self.severities:
            raise ValueError(
                f"eval.severities: expected a non-empty list of integers 1-5, got {bad or []}"
            )
        return self


# ------------------------------------------------------------------------------------ tracking
class TrackingConfig(_Section):
    uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db"
    )
    experiment: str = "clipray"


# --------------------------------------------------------------------------------------- sweep
class SearcherConfig(_Section):
    sampler: Literal["tpe", "random", "nsga2", "gp", "grid"] = Field(
        "tpe", description="Optuna sampler; grid enumerates choice/grid params"
    )
    seed: int = 0
    multi_objective: bool = Field(
        False, description="maximise clean and corrupted retrieval jointly"
    )


class AshaConfig(_Section):
    enabled: bool = False
    metric: str = Field("val/rsum", description="per-epoch clean metric reported by training")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepConfig(_Section):
    space: Path | None = Field(None, description="search_spaces/*.yaml; relative to this file")
    num_samples: int = Field(4, ge=1, description="trials in total, the baseline included")
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = Field("agg/mean_corrupted_rsum", description="objective among scoring metrics")
    mode: Literal["max", "min"] = "max"
    baseline: bool = Field(True, description="evaluate epsilon=0 first as the reference")
    searcher: SearcherConfig = SearcherConfig()
    asha: AshaConfig = AshaConfig()
    cpus_per_trial: float = Field(0.1, gt=0.0, description="the trial driver only waits")

    @model_validator(mode="after")
    def _space_exists(self) -> SweepConfig:
        _require_file(self.space, "sweep.space")
        return self


# ---------------------------------------------------------------------------------- experiment
class Experiment(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    storage: str = Field("runs", description="local dir, NFS path or s3://... for multi-node")
    data: DataConfig = SyntheticData()
    model: ModelConfig = ModelConfig()
    perturb: PerturbConfig = PerturbConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _check_model_and_layer(self) -> Experiment:
        from clipray.corrupt import MIN_SIDE
        from clipray.model import image_size, tower_depths

        depths = tower_depths(self.model.name)  # raises ValueError for unknown models
        check_pretrained(self.model)
        check_layer(self.perturb, depths)
        if image_size(self.model.name) < MIN_SIDE:
            raise ValueError(
                f"model.name: {self.model.name} takes {image_size(self.model.name)} px images; "
                f"corruptions need at least {MIN_SIDE} px"
            )
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not split evenly across "
                f"train.num_workers={self.train.num_workers}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; round-trips through :func:`experiment_from_dict`."""
        return self.model_dump(mode="json")


def check_pretrained(model: ModelConfig) -> None:
    """A local weights file that exists, or a tag open_clip knows for this architecture."""
    import open_clip

    value = model.pretrained
    if value is None or Path(value).is_file():
        return
    if _looks_like_file(value):
        raise ValueError(f"model.pretrained: file not found: {value}")
    tags = open_clip.list_pretrained_tags_by_model(model.name)
    if value not in tags:
        known = ", ".join(tags) if tags else "none for this architecture"
        raise ValueError(
            f"model.pretrained: {value!r} is neither a file nor a pretrained tag of "
            f"{model.name} (known tags: {known})"
        )


def torch_threads(cpus: float) -> int:
    """Threads for a process granted ``cpus`` logical CPUs: at least one, fractions rounded up."""
    return max(1, math.ceil(cpus))


def check_layer(perturb: PerturbConfig, depths: dict[str, int]) -> None:
    towers = ("image", "text") if perturb.tower == "both" else (perturb.tower,)
    for tower in towers:
        depth = depths[tower]
        if not -depth <= perturb.layer < depth:
            raise ValueError(
                f"perturb.layer: {perturb.layer} is beyond the {tower} tower's depth "
                f"(expected {-depth}..{depth - 1})"
            )


# ------------------------------------------------------------------------------------- loading
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
        if candidate.is_file() or _looks_like_file(model["pretrained"]):
            model["pretrained"] = str(candidate.resolve())
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("space"), str):
        sweep["space"] = str((base / sweep["space"]).resolve())


def _looks_like_file(value: str) -> bool:
    """A path rather than an open_clip pretrained tag (tags have no slash or file suffix)."""
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=v`` -> (["a", "b"], yaml-parsed v)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    return key.strip().split("."), yaml.safe_load(value) if value else None


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """``raw[a][b][c] = value`` for ``path = [a, b, c]``, creating sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for text in overrides:
        set_path(raw, *parse_override(text))


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
            and _data_kind({"kind": _data_kind(old), **value}) != _data_kind(old)
        )
        if isinstance(value, dict) and isinstance(old, dict) and not switches_kind:
            _deep_merge(dst[key], value)
        else:
            dst[key] = value
