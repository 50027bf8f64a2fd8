"""The experiment schema: one frozen pydantic section per concern, validated once.

An experiment file (``sweeps/*.yaml``) has one section per concern — ``data``, ``model``,
``perturb``, ``train``, ``eval``, ``tracking``, ``sweep`` — plus a ``name``, a ``seed`` and a
``storage``. Unknown keys are rejected; every default says why it is that value. Validators raise
ValueError naming the field; :mod:`clipray.config.loading` turns that into one-line ConfigErrors.
Only plain dicts cross process boundaries: :meth:`Experiment.to_dict` and
``loading.experiment_from_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from clipray.config.architectures import check_pretrained, image_size, tower_depths
from clipray.config.corruption_names import MIN_SIDE, resolve_corruptions


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # numpy's and Optuna's seeds are unsigned 32-bit
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


# ---------------------------------------------------------------------------------------- data
class SyntheticData(_Section):
    """Captioned shapes generated from ``data_seed``; the built-in default."""

    kind: Literal["synthetic"] = "synthetic"
    train_size: int = Field(2048, ge=1, description="enough for a tiny model to learn in minutes")
    val_size: int = Field(256, ge=1, description="per-epoch clean recall; small so it is cheap")
    test_size: int = Field(256, ge=1, description="scored under every corruption")
    image_size: int = Field(64, ge=16, le=512, description="matches the tiny models' input size")
    captions_per_image: int = Field(2, ge=1, le=5, description="exercises multi-caption recall")
    captions: Literal["layout", "counts", "colour"] = Field(
        "layout", description="layout: kind, size, count and position, facts every corruption "
        "keeps; counts: how many of each size and kind, no places; colour: also the colours"
    )  # fmt: skip
    backgrounds: Literal["palette", "varied"] = Field(
        "palette", description="palette: dark or light backgrounds; varied (layout or counts "
        "captions): any background, shapes a contrast apart (no absolute-brightness cue)"
    )  # fmt: skip
    grain: float = Field(
        0.0, ge=0, le=64, description="0: a mild uniform +-6 texture; > 0: Gaussian sensor noise, "
        "its sd drawn per image from [0, grain] levels (25 in the default sweep: BENCHMARKS.md)"
    )  # fmt: skip
    shading: float = Field(
        0.0, ge=0, le=128, description="uneven light: a smooth field added to the whole image, "
        "peak drawn per image from [0, shading] levels (80 in the default sweep: BENCHMARKS.md)"
    )  # fmt: skip
    min_shapes: int = Field(2, ge=1, le=4, description="2: few images share a layout caption")
    max_shapes: int = Field(3, ge=1, le=4, description="min..max shapes per image")

    @model_validator(mode="after")
    def _shape_range(self) -> SyntheticData:
        if self.backgrounds == "varied" and self.captions == "colour":
            raise ValueError("backgrounds: varied needs captions: layout or counts, not colour")
        if self.min_shapes > self.max_shapes:
            raise ValueError(
                f"min_shapes ({self.min_shapes}) must not exceed max_shapes ({self.max_shapes})"
            )
        return self

    data_seed: Seed = Field(1234, description="the dataset itself; independent of training seed")


class _FileData(_Section):  # data read from files: decoded off the training thread
    loader_workers: int = Field(
        2, ge=0, le=64, description="decode CPUs per rank; 0: on the training thread (processes)"
    )


class CsvData(_FileData):
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
            _require(getattr(self, name), f"data.{name}")
        _require(self.image_root, "data.image_root", "directory")
        return self


class KarpathyData(_FileData):
    """A Karpathy-style ``dataset_*.json`` (Flickr30k, COCO) with its train/val/test split."""

    kind: Literal["karpathy"] = "karpathy"
    path: Path
    image_root: Path

    @model_validator(mode="after")
    def _files_exist(self) -> KarpathyData:
        _require(self.path, "data.path")
        _require(self.image_root, "data.image_root", "directory")
        return self


Shards = str | list[str]  # brace patterns, local paths (relative to the file) or s3:// gs:// URIs


class WebDatasetData(_FileData):
    """img2dataset tar shards, streamed for training; val/test: small shard sets, in memory."""

    kind: Literal["webdataset"] = "webdataset"
    train: Shards
    train_samples: int = Field(
        ge=1,
        description="samples per epoch (as open_clip's --train-num-samples): a shard list "
        "is not counted up front",
    )
    val: Shards
    test: Shards | None = Field(None, description="defaults to the val shards")
    caption_field: str | None = Field(None, description="None: <key>.txt; else this .json field")
    ingest: Literal["ray_data", "processes"] = Field(
        "ray_data", description="sweeps: Ray Data tasks on any node, or processes per rank"
    )
    shuffle_buffer: int = Field(1000, ge=1, description="samples mixed across a rank's shards")
    max_skip_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="a run stops when more of the samples read between "
        "two checkpoints (an epoch by default) were damaged; 1%: img2dataset sets lose a few"
    )  # fmt: skip

    @field_validator("train", "val", "test")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if items is not None and (not items or any(not v.strip() for v in items)):
            raise ValueError("expected a shard pattern or a non-empty list of them")
        return value


def _require(path: Path | None, field: str, kind: str = "file") -> None:
    if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
        raise ValueError(f"{field}: {kind} not found: {path}")


def data_kind(value: Any) -> str | None:
    """The ``kind`` of a data section; omitted means the built-in synthetic dataset."""
    if isinstance(value, dict):
        return value.get("kind", "synthetic")
    return getattr(value, "kind", None)


DATA_KINDS = ("synthetic", "csv", "karpathy", "webdataset")
DataConfig = Annotated[
    Annotated[SyntheticData, Tag("synthetic")]
    | Annotated[CsvData, Tag("csv")]
    | Annotated[KarpathyData, Tag("karpathy")]
    | Annotated[WebDatasetData, Tag("webdataset")],
    Discriminator(data_kind),
]


# --------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = Field("clipray-tiny-vit", description="open_clip architecture or bundled tiny one")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (must be cached locally) or a checkpoint file"
    )


# ------------------------------------------------------------------------------------- perturb
class PerturbConfig(_Section):
    """Feature-level PGD (or, as its control, random noise of the same size) on the hidden states
    at the output of block ``layer``."""

    kind: Literal["pgd", "noise"] = Field(
        "pgd",
        description="noise: the control for pgd — a random delta on the surface of the same "
        "ball (same norm and radius, same layer), no gradient steps",
    )
    tower: Literal["image", "text", "both"] = "image"
    layer: int = Field(0, description="block index; negative counts from the end like Python")
    epsilon: float = Field(0.0, ge=0.0, description="0 means clean training (the baseline)")
    epsilon_mode: Literal["absolute", "relative"] = Field(
        "relative",
        description="relative: times the per-sample feature RMS, comparable across layers",
    )
    steps: int = Field(0, ge=0, description="PGD steps; 0 means clean training (pgd only)")
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
        return self.epsilon > 0.0 and (self.steps > 0 or self.kind == "noise")

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
    betas: tuple[Beta, Beta] = Field((0.9, 0.98), description="AdamW's; CLIP's (0.999 stalls)")
    eps: float = Field(1e-6, gt=0.0, description="AdamW's; CLIP's value")
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
    seed: Seed = Field(0, description="corruption randomness; fixed so trials see the same images")
    cache_dir: str | None = Field(None, description="None: <storage>/cache (local storage)")
    scorers: ScorerConfig = ScorerConfig()

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
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
    seed: Seed = 0
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
    num_samples: int = Field(
        4, ge=1, description="configurations in total, the baseline included (each run seeds times)"
    )
    seeds: int = Field(1, ge=1, le=100, description="paired seeds per configuration (README)")
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = Field("agg/mean_corrupted_rsum", description="objective among scoring metrics")
    mode: Literal["max", "min"] = "max"
    baseline: bool = Field(True, description="evaluate epsilon=0 first as the reference")
    searcher: SearcherConfig = SearcherConfig()
    asha: AshaConfig = AshaConfig()
    cpus_per_trial: float = Field(0.1, gt=0.0, description="the trial driver only waits")

    @model_validator(mode="after")
    def _space_exists(self) -> SweepConfig:
        _require(self.space, "sweep.space")
        if self.seeds > 1 and self.asha.enabled:
            raise ValueError(
                "seeds: paired seeds and asha.enabled do not mix (ASHA would stop some seeds of "
                "an arm and leave the lucky ones to compare); disable one"
            )
        return self


# ---------------------------------------------------------------------------------- experiment
class Experiment(_Section):
    name: str = Field(
        "default",
        max_length=100,  # a directory name; file systems allow 255 bytes
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the sweep's directory: <storage>/<name>/",
    )
    seed: Seed = 0
    storage: str = Field(
        "runs", min_length=1, description="local dir, NFS path or s3://... for multi-node"
    )
    data: DataConfig = SyntheticData()
    model: ModelConfig = ModelConfig()
    perturb: PerturbConfig = PerturbConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _check_model_and_layer(self) -> Experiment:
        depths = tower_depths(self.model.name)  # raises ValueError for unknown models
        check_pretrained(self.model.name, self.model.pretrained)
        check_layer(self.perturb, depths)
        if image_size(self.model.name) < MIN_SIDE:
            raise ValueError(
                f"model.name: {self.model.name} takes {image_size(self.model.name)} px images; "
                f"corruptions need at least {MIN_SIDE} px"
            )
        if self.seed + self.sweep.seeds - 1 > SEED_MAX:
            raise ValueError(
                f"sweep.seeds: seeds {self.seed}..{self.seed + self.sweep.seeds - 1} pass the "
                f"largest seed, {SEED_MAX}"
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


def check_layer(perturb: PerturbConfig, depths: dict[str, int]) -> None:
    towers = ("image", "text") if perturb.tower == "both" else (perturb.tower,)
    for tower in towers:
        depth = depths[tower]
        if not -depth <= perturb.layer < depth:
            raise ValueError(
                f"perturb.layer: {perturb.layer} is beyond the {tower} tower's depth "
                f"(expected {-depth}..{depth - 1})"
            )
