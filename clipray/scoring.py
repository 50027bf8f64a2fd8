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

import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util import list_named_actors

from clipray.config import Experiment, ModelConfig, experiment_from_dict, torch_threads
from clipray.corrupt_cache import CorruptionCache
from clipray.metrics import Cell
from clipray.scoring_plan import (  # re-exported: the pool's public planning API
    BUILD_COST,
    CLEAN,
    EvalSet,
    assign_cells,
    build_weights_model,
    cell_cost,
    eval_cells,
    flat_result,
    load_eval_set,
    load_state,
    resolve_cache_dir,
    weights_state,
    with_reference,
)

__all__ = [
    "BUILD_COST",
    "CLEAN",
    "EvalSet",
    "ScorerPool",
    "assign_cells",
    "build_weights_model",
    "cell_cost",
    "eval_cells",
    "flat_result",
    "load_eval_set",
    "load_state",
    "resolve_cache_dir",
    "weights_state",
    "with_reference",
]

MAX_REPLACEMENTS = 3  # per worker and call: an actor that keeps dying is a bug, not bad luck
COORDINATOR_THREADS = 32  # concurrent score() calls served; each mostly waits on its workers
MODELS_KEPT = 2  # per worker: interleaved requests of two trials do not rebuild each other's


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
