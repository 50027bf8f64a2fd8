"""Scoring checkpoints on corrupted image–text retrieval with a pool of Ray actors.

A :class:`ScorerPool` is one coordinator actor (threaded, so concurrent trials are served) that
owns ``eval.scorers.num_actors`` worker actors. The eval cells, the clean set plus every
(corruption, severity), are split between the workers once by :func:`assign_cells`; each worker
builds or loads its cells through the :class:`CorruptionCache` and keeps them in memory. Scoring
a checkpoint computes the caption embeddings once (on one worker; the coordinator ``ray.put``-s
them for all), then every worker embeds its own cells and returns plain metric dicts, merged
into one flat dict in a fixed cell order, so the result does not depend on the number of actors.
A worker that dies is replaced (it reloads its cells from the cache) and its part redone.

This is an orchestration module: it imports Ray; it never imports MLflow.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util import list_named_actors

from clipray.config import (
    EvalConfig,
    Experiment,
    ModelConfig,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    read_yaml,
    torch_threads,
)
from clipray.corrupt import resolve_corruptions
from clipray.corrupt_cache import CorruptionCache, fingerprint_images
from clipray.metrics import (
    Cell,
    agg_key,
    cell_table,
    clean_key,
    corruption_summary,
    flatten_cell_metrics,
    flatten_clean,
    flatten_summary,
    per_corruption_key,
    unflatten_cell_metrics,
)

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
MAX_REPLACEMENTS = 3  # per worker and call: an actor that keeps dying is a bug, not bad luck
COORDINATOR_THREADS = 32  # concurrent score() calls served; each mostly waits on its workers
MODELS_KEPT = 2  # per worker: interleaved requests of two trials do not rebuild each other's


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
    if "://" in exp.storage:
        raise ValueError(
            f"eval.cache_dir: storage {exp.storage!r} is remote; set eval.cache_dir to a local "
            "or shared directory"
        )
    return (Path(exp.storage).expanduser() / "cache").resolve()


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
    from clipray.data import load_split
    from clipray.model import image_size

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
    from clipray.model import image_size

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
    return {str(k).removeprefix("module."): v for k, v in blob["model"].items()}


def load_state(clip: Any, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Strictly load ``state`` into ``clip.model``; ValueError (one line) if it does not fit.

    A failed load may leave some tensors overwritten; the next successful one replaces all.
    """
    try:
        clip.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ValueError(f"weights: state dict does not fit {name} ({first})") from None


def build_weights_model(blob: Any, pool_model: str, device: torch.device | str = "cpu") -> Any:
    """A ClipModel in eval mode with ``blob``'s weights (see :func:`weights_state`)."""
    from clipray.model import build_model

    state = weights_state(blob, pool_model)
    clip = build_model(ModelConfig(name=pool_model), device)
    load_state(clip, state, pool_model)
    clip.model.eval()
    return clip


def flat_result(cells: Sequence[Cell], results: Mapping[Cell, Mapping[str, float]]) -> dict:
    """One flat dict: clean/*, corrupt/<c>/s<k>/* in ``cells`` order, agg/* without reference."""
    corrupted = {cell: results[cell] for cell in cells if cell != CLEAN}
    summary = corruption_summary(results[CLEAN], corrupted)
    flat = flatten_clean(results[CLEAN]) | flatten_cell_metrics(corrupted)
    return flat | flatten_summary(summary)


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


# ------------------------------------------------------------------------------------ actors
class _Worker:
    """Holds a shard of eval cells; embeds them with the weights of each request."""

    def __init__(self, exp_dict: dict, eval_set: EvalSet, cache_dir: str) -> None:
        self.exp = experiment_from_dict(exp_dict)
        scorers = self.exp.eval.scorers
        torch.set_num_threads(torch_threads(scorers.cpus_per_actor))
        self.device = torch.device("cuda" if scorers.gpus_per_actor > 0 else "cpu")
        self.eval = eval_set
        self.clean = np.array(eval_set.images)  # writable copy of the object-store view
        self.owner = torch.from_numpy(np.array(eval_set.owner))
        self.cache = CorruptionCache(cache_dir)
        self.cells: dict[Cell, np.ndarray] = {}
        self.models: OrderedDict[str, Any] = OrderedDict()  # request -> its model
        self.spare: list[Any] = []  # models of finished requests, for reuse
        self.counts: Counter[str] = Counter()

    def load_cell(self, cell: Cell) -> None:
        """Build or load one cell into memory (idempotent)."""
        self._images(tuple(cell))

    def _images(self, cell: Cell) -> np.ndarray:
        if cell == CLEAN:
            return self.clean
        if cell not in self.cells:
            name, severity = cell
            self.cells[cell] = self.cache.get_or_build(
                self.clean,
                split=self.eval.split,
                corruption=name,
                severity=severity,
                seed=self.exp.eval.seed,
                fingerprint=self.eval.fingerprint,
            )
        return self.cells[cell]

    def _model(self, request: str, blob: Any) -> Any:
        """The request's model: its weights loaded into a spare model of the pool's architecture
        (building one costs far more than loading weights), at most MODELS_KEPT of them."""
        if request in self.models:
            return self.models[request]
        name = self.exp.model.name
        state = weights_state(blob, name)
        if self.spare:
            clip = self.spare.pop()
        elif len(self.models) >= MODELS_KEPT:
            clip = self.models.popitem(last=False)[1]
        else:
            from clipray.model import build_model

            clip = build_model(ModelConfig(name=name), self.device)
            clip.model.eval()
        try:
            load_state(clip, state, name)
        except ValueError:
            self.spare.append(clip)
            raise
        self.models[request] = clip
        self.counts["checkpoint_loads"] += 1
        return clip

    def embed_texts(self, request: str, blob: Any) -> torch.Tensor:
        from clipray.encode import embed_texts

        clip = self._model(request, blob)
        self.counts["text_embeds"] += 1
        tokens = clip.tokenize(self.eval.texts)
        return embed_texts(clip, tokens, self.exp.eval.batch_size, self.device)

    def score_cells(
        self, request: str, blob: Any, text_emb: torch.Tensor, cells: list[Cell]
    ) -> dict[Cell, dict[str, float]]:
        from clipray.encode import embed_images
        from clipray.metrics import retrieval_recall

        clip = self._model(request, blob)
        out = {}
        for cell in map(tuple, cells):
            emb = embed_images(clip, self._images(cell), self.exp.eval.batch_size, self.device)
            out[cell] = retrieval_recall(emb, text_emb, self.owner)
            self.counts["cells_scored"] += 1
        if self.models.pop(request, None) is clip:  # this request is done on this worker
            self.spare.append(clip)
        return out

    def stats(self) -> dict[str, int]:
        s = self.cache.stats
        return dict(self.counts, hits=s.hits, builds=s.builds, rejected=s.rejected)


def _unwrap(err: RayTaskError) -> Exception:
    """The user-facing error inside a task error (ValueError keeps its one-line message)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, ValueError) else err


def _start_worker(exp_dict: dict, eval_ref: Any, cache_dir: str, shard: list[Cell]) -> tuple:
    """A worker actor for ``shard`` and the refs of its cell loads (started at once)."""
    sc = exp_dict["eval"]["scorers"]
    actor = (
        ray.remote(_Worker)
        .options(num_cpus=sc["cpus_per_actor"], num_gpus=sc["gpus_per_actor"], max_restarts=0)
        .remote(exp_dict, eval_ref, cache_dir)
    )
    return actor, [actor.load_cell.remote(cell) for cell in shard]


class _Coordinator:
    """Owns the workers; serves score() for any caller (Ray actor, threaded).

    The first workers are started by :meth:`ScorerPool.create` so that they start up while this
    actor does; replacements are started here.
    """

    def __init__(
        self, exp_dict: dict, cells: list, shards: list, started: list, eval_box: list, cache: str
    ) -> None:
        self.exp_dict, self.eval_ref, self.cache_dir = exp_dict, eval_box[0], cache
        self.cells = [tuple(c) for c in cells]
        self.shards = [[tuple(c) for c in shard] for shard in shards]
        self.workers = [actor for actor, _ in started]
        self.loads = [loads for _, loads in started]
        self.lock = threading.Lock()
        self.replaced = 0

    def _spawn(self, i: int) -> None:
        started = _start_worker(self.exp_dict, self.eval_ref, self.cache_dir, self.shards[i])
        self.workers[i], self.loads[i] = started

    def _replace(self, i: int, dead: Any) -> Any:
        """Worker i, replaced if it still is ``dead`` (another thread may have done it)."""
        with self.lock:
            if self.workers[i] == dead:
                ray.kill(dead)
                self._spawn(i)
                self.replaced += 1
            return self.workers[i]

    def _call(self, i: int, submit: Callable[[Any], Any], first: tuple | None = None) -> Any:
        """ray.get(submit(worker i)), replacing the worker and resubmitting while it dies.

        ``first``: (worker, ref) of a call already submitted.
        """
        actor, ref = first if first is not None else (self.workers[i], None)
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                return ray.get(ref if ref is not None else submit(actor))
            except RayActorError:
                if attempt == MAX_REPLACEMENTS:
                    raise
                actor, ref = self._replace(i, actor), None
            except RayTaskError as e:
                raise _unwrap(e) from None
        raise AssertionError("unreachable")

    def ready(self) -> dict[str, Any]:
        for i in range(len(self.shards)):
            with self.lock:
                first = (self.workers[i], self.loads[i])
            self._call(i, lambda _, i=i: self.loads[i], first)  # replacements reload in _spawn
        return self.info()

    def progress(self) -> tuple[int, int]:
        """(cells loaded or built, cells) across workers."""
        refs = [r for slot in self.loads for r in slot]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(done), len(refs)

    def score(self, weights_box: list) -> dict[str, float]:
        weights, request = weights_box[0], uuid.uuid4().hex
        text_at = min(range(len(self.shards)), key=lambda i: sum(map(cell_cost, self.shards[i])))
        text = self._call(text_at, lambda a: a.embed_texts.remote(request, weights))
        text_ref = ray.put(text)
        submit = [
            lambda a, i=i: a.score_cells.remote(request, weights, text_ref, self.shards[i])
            for i in range(len(self.shards))
        ]
        firsts = [(a, s(a)) for a, s in zip(list(self.workers), submit, strict=True)]
        results: dict[Cell, dict[str, float]] = {}
        for i, s in enumerate(submit):
            results.update(self._call(i, s, firsts[i]))
        return flat_result(self.cells, results)

    def info(self) -> dict[str, Any]:
        per_actor = []
        for i in range(len(self.shards)):
            per_actor.append(self._call(i, lambda a: a.stats.remote()))
        totals = Counter()
        for s in per_actor:
            totals.update(s)
        return {
            "cells": len(self.cells),  # the clean cell included
            "corrupted_cells": len(self.cells) - 1,
            "actors": len(self.shards),
            "shards": [[list(c) for c in s] for s in self.shards],
            "replaced": self.replaced,
            **{k: totals.get(k, 0) for k in ("hits", "builds", "rejected")},
            **{k: totals.get(k, 0) for k in ("text_embeds", "checkpoint_loads", "cells_scored")},
            "per_actor": per_actor,
        }

    def workers_handles(self) -> list:
        return list(self.workers)

    def shutdown(self) -> None:
        for actor in self.workers:
            ray.kill(actor)


# ------------------------------------------------------------------------------------ facade
class ScorerPool:
    """Thin, picklable handle on a coordinator actor; usable from any Ray process."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    @classmethod
    def create(
        cls, exp: Experiment, name: str | None = None, eval_set: EvalSet | None = None
    ) -> ScorerPool:
        """Start the pool (loading starts at once; :meth:`ready` waits for it)."""
        cache_dir = str(resolve_cache_dir(exp))
        cells = eval_cells(exp.eval)
        eval_set = eval_set if eval_set is not None else load_eval_set(exp)
        _check_resources(exp)
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": COORDINATOR_THREADS}
        if name is not None:
            if name in list_named_actors():
                raise ValueError(f"scorer pool {name!r} exists already; use ScorerPool.lookup")
            options["name"] = name
        exp_dict, eval_ref = exp.to_dict(), ray.put(eval_set)
        shards = [s for s in assign_cells(cells, exp.eval.scorers.num_actors) if s]
        started = [_start_worker(exp_dict, eval_ref, cache_dir, shard) for shard in shards]
        handle = (
            ray.remote(_Coordinator)
            .options(**options)
            .remote(exp_dict, cells, shards, started, [eval_ref], cache_dir)
        )
        return cls(handle)

    @classmethod
    def lookup(cls, name: str) -> ScorerPool:
        return cls(ray.get_actor(name))

    def ready(self) -> dict[str, Any]:
        """Block until every cell is built or loaded; cells, actors, cache hits/builds."""
        return _get(self.coordinator.ready.remote())

    def progress(self) -> tuple[int, int]:
        return tuple(_get(self.coordinator.progress.remote()))

    def stats(self) -> dict[str, Any]:
        return _get(self.coordinator.info.remote())

    def workers(self) -> list:
        return _get(self.coordinator.workers_handles.remote())

    def score_async(self, weights: Mapping | ray.ObjectRef) -> ray.ObjectRef:
        """Like :meth:`score`, returning the ObjectRef of the flat dict."""
        if not isinstance(weights, ray.ObjectRef):
            if not isinstance(weights, Mapping):
                raise ValueError("weights: expected a checkpoint dict or an ObjectRef to one")
            weights = ray.put({k: weights[k] for k in ("config", "model") if k in weights})
        return self.coordinator.score.remote([weights])  # boxed: workers resolve it, not us

    def score(self, weights: Mapping | ray.ObjectRef) -> dict[str, float]:
        """Flat clean/*, corrupt/<c>/s<k>/*, agg/* of a checkpoint dict (or a ref to one)."""
        return _get(self.score_async(weights))

    def score_file(self, path: str | Path) -> dict[str, float]:
        from clipray.train import load_checkpoint

        return self.score(load_checkpoint(Path(path)))

    def shutdown(self) -> None:
        _get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)


def _get(ref: ray.ObjectRef) -> Any:
    try:
        return ray.get(ref)
    except RayTaskError as e:
        raise _unwrap(e) from None


def _check_resources(exp: Experiment) -> None:
    """Refuse a pool whose actors could never be placed (they would wait forever)."""
    if not ray.is_initialized():
        raise RuntimeError("ScorerPool.create: Ray is not running; call ray.init() first")
    sc, total = exp.eval.scorers, ray.cluster_resources()
    for what, need in (("CPU", sc.cpus_per_actor), ("GPU", sc.gpus_per_actor)):
        if need > total.get(what, 0.0):
            raise ValueError(
                f"eval.scorers: each actor needs {need} {what} but the Ray cluster has "
                f"{total.get(what, 0.0)}"
            )


# --------------------------------------------------------------------------- command support
def command_experiment(
    blob: Mapping[str, Any], file: str | None, overrides: list[str], source: str
) -> Experiment:
    """The checkpoint's experiment; ``file``'s storage/data/eval sections and ``--set`` win."""
    if not isinstance(blob.get("config"), Mapping):
        raise ValueError(f"checkpoint {source}: no experiment config inside")
    raw = copy.deepcopy(dict(blob["config"]))
    if file is not None:
        resolved = load_experiment(file).to_dict()  # validated, paths made absolute
        for section in ("storage", "data", "eval"):
            if section in read_yaml(Path(file)):
                raw[section] = resolved[section]
    apply_overrides(raw, overrides)
    return experiment_from_dict(raw, source)


def score_checkpoint(
    exp: Experiment, blob: Mapping[str, Any], progress: bool = True
) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate everything, then score ``blob`` on a pool (starting a local Ray if none is up).

    Returns (flat result, pool info). Nothing is written and no actor starts on bad input.
    """
    from tqdm import tqdm

    resolve_cache_dir(exp)
    eval_cells(exp.eval)
    build_weights_model(blob, exp.model.name)  # fits the architecture?
    eval_set = load_eval_set(exp)
    sc = exp.eval.scorers
    if sc.gpus_per_actor > 0 and not ray.is_initialized() and not torch.cuda.is_available():
        raise ValueError("eval.scorers.gpus_per_actor: > 0 but no CUDA device is visible")
    started = not ray.is_initialized()
    if started:
        cpus = max(1, math.ceil(sc.num_actors * sc.cpus_per_actor))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    pool = None
    try:
        pool = ScorerPool.create(exp, eval_set=eval_set)
        ready = pool.coordinator.ready.remote()
        with tqdm(total=len(eval_cells(exp.eval)), desc="cells", disable=not progress) as bar:
            while not ray.wait([ready], timeout=0.5)[0]:
                if (done := pool.progress()[0]) > bar.n:
                    bar.update(done - bar.n)
            _get(ready)
            bar.update(bar.total - bar.n)
        flat = pool.score(blob)
        return flat, pool.stats()
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


def rsum_table(flat: Mapping[str, float]) -> str:
    """Markdown table of RSUM per corruption x severity with the per-corruption mean, then the
    clean RSUM and the overall aggregates."""
    corruptions, severities, rows = cell_table(flat, "rsum")
    lines = ["| corruption | " + " | ".join(f"s{s}" for s in severities) + " | mean |"]
    lines.append("|---" * (len(severities) + 2) + "|")
    for name, row in zip(corruptions, rows, strict=True):
        mean = flat.get(agg_key(per_corruption_key("mean_rsum", name)), math.nan)
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in [*row, mean]) + " |")
    lines.append(f"\n{clean_key('rsum')} {flat[clean_key('rsum')]:.2f}")
    lines += [f"{k} {v:.4g}" for k, v in flat.items() if k.startswith("agg/") and k.count("/") == 1]
    return "\n".join(lines)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Readers see the old file or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
