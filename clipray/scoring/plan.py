"""What a scoring pool scores, with what, and how results combine: pure, no Ray.

The eval cells (the clean set plus every (corruption, severity)), their build costs and their
balanced assignment to actors; the evaluation images; checking a checkpoint's weights against
the pool's architecture; and assembling per-cell metrics into one flat dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipray.config.architectures import image_size
from clipray.config.corruption_names import resolve_corruptions
from clipray.config.schema import EvalConfig, Experiment, ModelConfig
from clipray.core import storage
from clipray.core.checkpoint import load_state, weights_in
from clipray.core.data import load_split
from clipray.core.metrics import (
    Cell,
    cell_key,
    clean_key,
    corruption_summary,
    flatten_cell_metrics,
    flatten_clean,
    flatten_summary,
    retrieval_keys,
    unflatten_cell_metrics,
)
from clipray.core.model import ClipModel, build_model
from clipray.scoring.cache import fingerprint_images

CLEAN: Cell = ("clean", 0)  # the uncorrupted set, scored like any other cell
# Build cost of one cell: ms per 224 px image at severity 3, measured on one core of the 2-core
# dev machine (as benchmarks/bench_corrupt.py does); severity matters far less than corruption.
BUILD_COST: Mapping[str, float] = {
    "gaussian_noise": 4.5,
    "shot_noise": 14.6,
    "impulse_noise": 3.4,
    "defocus_blur": 4.4,
    "glass_blur": 16.0,
    "motion_blur": 14.3,
    "zoom_blur": 91.0,
    "snow": 9.6,
    "frost": 1.9,
    "fog": 4.0,
    "brightness": 19.3,
    "contrast": 2.2,
    "elastic_transform": 15.1,
    "pixelate": 0.3,
    "jpeg_compression": 0.5,
    "speckle_noise": 3.3,
    "gaussian_blur": 3.5,
    "spatter": 5.3,
    "saturate": 19.2,
}


# ---------------------------------------------------------------------------- pure planning
def eval_cells(cfg: EvalConfig) -> list[Cell]:
    """The clean cell, then every (corruption, severity) in registry/config order."""
    names = resolve_corruptions(cfg.corruptions)  # the config refuses an empty list
    return [CLEAN] + [(name, int(s)) for name in names for s in sorted(set(cfg.severities))]


def cell_cost(cell: Cell) -> float:
    """Relative cost of building ``cell``: its corruption's BUILD_COST (the clean cell: 0)."""
    return 0.0 if cell == CLEAN else BUILD_COST[cell[0]]


def assign_cells(
    cells: Sequence[Cell], n_actors: int, cost: Callable[[Cell], float] = cell_cost
) -> list[list[Cell]]:
    """Split ``cells`` over ``n_actors``: longest-processing-time first, capacity-bounded.

    Every scoring request costs the same per cell on every actor, so each actor gets at most
    ceil(cells / actors) cells; within that, the most expensive to build goes next to the actor
    with the least build cost so far (ties: fewer cells, lower index). Deterministic and
    independent of the input order; each shard keeps the input order.
    """
    if isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1:
        raise ValueError(f"n_actors must be an int >= 1, got {n_actors!r}")
    if len(set(cells)) != len(cells):
        raise ValueError("cells must be distinct")
    cap = math.ceil(len(cells) / n_actors)
    loads, shards = [0.0] * n_actors, [[] for _ in range(n_actors)]
    for cell in sorted(cells, key=lambda c: (-cost(c), c)):
        k = min(
            (k for k in range(n_actors) if len(shards[k]) < cap),
            key=lambda k: (loads[k], len(shards[k]), k),
        )
        loads[k] += cost(cell)
        shards[k].append(cell)
    position = {cell: i for i, cell in enumerate(cells)}
    return [sorted(shard, key=position.__getitem__) for shard in shards]


def resolve_cache_dir(exp: Experiment) -> Path:
    """eval.cache_dir, else <storage>/cache; absolute, since actors may run elsewhere."""
    if exp.eval.cache_dir is not None:
        return Path(exp.eval.cache_dir).expanduser().resolve()
    if storage.is_remote(exp.storage):
        raise ValueError(
            f"eval.cache_dir: storage {exp.storage!r} is remote; set eval.cache_dir to a local "
            "or shared directory"
        )
    return Path(storage.absolute(exp.storage)) / "cache"


@dataclass(frozen=True)
class EvalSet:
    """The clean eval split at the model resolution, with its captions."""

    images: np.ndarray  # uint8 N x S x S x 3
    texts: list[str]
    owner: np.ndarray  # int64, image index of each caption
    fingerprint: str
    split: str


def load_eval_set(exp: Experiment) -> EvalSet:
    """Load ``eval.split`` (first ``eval.max_images``) at the model's input size."""
    split = load_split(exp.data, exp.eval.split).subset(exp.eval.max_images)
    if len(split) == 0:
        raise ValueError(f"eval.split: the {exp.eval.split} split is empty")
    images = np.ascontiguousarray(split.load_all(image_size(exp.model.name)))
    texts, owner = split.flat_captions()
    return EvalSet(images, texts, owner.numpy(), fingerprint_images(images), exp.eval.split)


def weights_state(blob: Any, pool_model: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint dict, once its model matches the pool's (else ValueError).

    ``blob`` has ``config`` (its experiment dict) and ``model`` (a state dict). Only the model
    section of its config is read: its data paths may not exist on this node.
    """
    if not isinstance(blob, Mapping) or not isinstance(blob.get("model"), Mapping):
        raise ValueError("weights: expected a checkpoint dict with 'config' and 'model' entries")
    config = blob.get("config")
    section = config.get("model", {}) if isinstance(config, Mapping) else None
    if not isinstance(section, Mapping):
        raise ValueError("weights: the checkpoint has no experiment config with a model section")
    try:
        name = ModelConfig.model_validate(dict(section)).name
        size = image_size(name)
    except ValueError as e:
        raise ValueError(f"weights: bad model section ({str(e).splitlines()[0]})") from None
    if name != pool_model:
        raise ValueError(
            f"weights: model {name!r} ({size} px) does not match the pool's model "
            f"{pool_model!r} ({image_size(pool_model)} px)"
        )
    return weights_in(dict(blob["model"]), "weights")


def build_weights_model(
    blob: Any, pool_model: str, device: torch.device | str = "cpu"
) -> ClipModel:
    """A ClipModel in eval mode with ``blob``'s weights (see :func:`weights_state`)."""
    state = weights_state(blob, pool_model)
    clip = build_model(ModelConfig(name=pool_model), device)
    load_state(clip.model, state, "weights", pool_model)
    clip.model.eval()
    return clip


def flat_result(cells: Sequence[Cell], results: Mapping[Cell, Mapping[str, float]]) -> dict:
    """One flat dict: clean/*, corrupt/<c>/s<k>/* in ``cells`` order, agg/* without reference."""
    corrupted = {cell: results[cell] for cell in cells if cell != CLEAN}
    summary = corruption_summary(results[CLEAN], corrupted)
    flat = flatten_clean(results[CLEAN]) | flatten_cell_metrics(corrupted)
    return flat | flatten_summary(summary)


OWNERS = "text_to_image"  # in a trial's ranks: the image of each caption (t2i query order)


def flat_ranks(results: Mapping[Cell, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-query ranks by the key prefix of their metrics: ``clean/i2t``, ``clean/t2i``,
    ``corrupt/<c>/s<k>/i2t``... (the RSUM of a prefix's ranks is that prefix's ``rsum``)."""
    out = {}
    for cell, pair in results.items():
        for direction, ranks in zip(("i2t", "t2i"), pair, strict=True):
            key = clean_key(direction) if cell == CLEAN else cell_key(*cell, direction)
            out[key] = ranks
    return out


def with_reference(flat: Mapping[str, float], reference_flat: Mapping[str, float]) -> dict:
    """``flat`` with its agg/* recomputed against a reference model's flat result (mCE etc.)."""

    def parts(d: Mapping[str, float], what: str) -> tuple[dict, dict]:
        if clean_key("rsum") not in d:
            raise ValueError(f"{what}: no {clean_key('rsum')!r} key; not a scoring result")
        return {"rsum": d[clean_key("rsum")]}, unflatten_cell_metrics(d)

    clean, cells = parts(flat, "flat")
    ref_clean, ref_cells = parts(reference_flat, "reference_flat")
    summary = corruption_summary(clean, cells, ref_clean, ref_cells)
    return {**flat, **flatten_summary(summary)}


def result_keys(cfg: EvalConfig, reference: bool) -> list[str]:
    """Every key a scoring result for ``cfg`` holds (the agg/* against a reference model too,
    when there is one), found by assembling a result of placeholder values."""
    placeholder = dict.fromkeys(retrieval_keys(), 1.0)
    cells = eval_cells(cfg)
    flat = flat_result(cells, dict.fromkeys(cells, placeholder))
    return list(with_reference(flat, flat) if reference else flat)
