"""Scoring checkpoints on corrupted image–text retrieval with a pool of Ray actors.

A :class:`ScorerPool` is one coordinator actor (threaded, so concurrent trials are served) that
owns ``eval.scorers.num_actors`` :class:`~clipray.scoring.worker.ScorerWorker` actors. The eval
cells, the clean set plus every (corruption, severity), are split between the workers once by
:func:`~clipray.scoring.plan.assign_cells`; each worker builds or loads its cells through the
corruption cache and keeps them in memory. Scoring a checkpoint computes the caption embeddings
once (on one worker; the coordinator ``ray.put``-s them for all), then every worker embeds its own
cells and returns plain metric dicts, merged into one flat dict in a fixed cell order, so the
result does not depend on the number of actors.

A worker (or the coordinator) that dies is restarted by Ray itself (``max_restarts``) and the
calls it had in flight are retried on the restarted actor (``max_task_retries``); a restarted
worker reloads its cells from the cache as they are asked for. Ray's semantics cover every case
the pool needs (a worker killed while loading, while scoring, or between requests), so the pool
keeps no replacement logic of its own. The coordinator loads the clean eval set and creates the
workers itself, so it owns both; the eval set goes with every call (never as a constructor
argument, which would have to outlive every restart), and a restarted coordinator rebuilds the
pool from its own small, inline arguments.

This is an orchestration module: it imports Ray; it never imports MLflow.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayTaskError
from ray.util import list_named_actors

from clipray.config.loading import experiment_from_dict
from clipray.config.schema import Experiment
from clipray.core.checkpoint import load_checkpoint
from clipray.core.metrics import Cell
from clipray.scoring.plan import (
    OWNERS,
    assign_cells,
    build_weights_model,
    cell_cost,
    eval_cells,
    flat_ranks,
    flat_result,
    load_eval_set,
    resolve_cache_dir,
)
from clipray.scoring.worker import ScorerWorker

RESTARTS = 3  # per worker: an actor that keeps dying is a bug, not bad luck
COORDINATOR_THREADS = 32  # concurrent score() calls served; each mostly waits on its workers


class _RayWorker(ScorerWorker):
    """The worker as an actor (its process id tells a restarted one from the first)."""

    def pid(self) -> int:
        return os.getpid()


def _unwrap(err: RayTaskError) -> Exception:
    """The user-facing error inside a task error (ValueError keeps its one-line message)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, ValueError) else err


def _start_worker(exp_dict: dict, eval_ref: Any, cache_dir: str, shard: list[Cell]) -> tuple:
    """A worker actor for ``shard`` and the refs of its cell loads (started at once)."""
    sc = exp_dict["eval"]["scorers"]
    actor = (
        ray.remote(_RayWorker)
        .options(
            num_cpus=sc["cpus_per_actor"],
            num_gpus=sc["gpus_per_actor"],
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
        )
        .remote(exp_dict, cache_dir)
    )
    return actor, [actor.load_cell.remote(eval_ref, cell) for cell in shard]


class _Coordinator:
    """Owns the eval set and the workers; serves score() for any caller (Ray actor, threaded)."""

    def __init__(self, exp_dict: dict, cache_dir: str, shards: list) -> None:
        exp = experiment_from_dict(exp_dict)
        self.cells = eval_cells(exp.eval)
        self.shards = [[tuple(c) for c in shard] for shard in shards]
        # Held for the pool's life and sent with every call, so a restarted worker has it.
        eval_set = load_eval_set(exp)
        self.owner = np.asarray(eval_set.owner, dtype=np.int32)  # each caption's image
        self.eval_ref = ray.put(eval_set)
        started = [_start_worker(exp_dict, self.eval_ref, cache_dir, s) for s in self.shards]
        self.workers = [actor for actor, _ in started]
        self.loads = [loads for _, loads in started]

    def ready(self) -> dict[str, Any]:
        for loads in self.loads:
            _get(loads)
        return self.info()

    def progress(self) -> tuple[int, int]:
        """(cells loaded or built, cells) across workers."""
        refs = [r for slot in self.loads for r in slot]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(done), len(refs)

    def score(self, weights_box: list, ranks: bool = False) -> Any:
        weights, request = weights_box[0], uuid.uuid4().hex
        text_at = min(range(len(self.shards)), key=lambda i: sum(map(cell_cost, self.shards[i])))
        text = self.workers[text_at].embed_texts.remote(self.eval_ref, request, weights)
        text_ref = ray.put(_get(text))
        refs = [
            worker.score_cells.remote(self.eval_ref, request, weights, text_ref, shard)
            for worker, shard in zip(self.workers, self.shards, strict=True)
        ]
        results: dict[Cell, tuple] = {}
        for part in _get(refs):
            results.update(part)
        flat = flat_result(self.cells, {cell: r[0] for cell, r in results.items()})
        if not ranks:
            return flat
        return flat, {**flat_ranks({c: r[1] for c, r in results.items()}), OWNERS: self.owner}

    def info(self) -> dict[str, Any]:
        per_actor = _get([worker.stats.remote() for worker in self.workers])
        totals: Counter[str] = Counter()
        for s in per_actor:
            totals.update(s)
        return {
            "cells": len(self.cells),  # the clean cell included
            "corrupted_cells": len(self.cells) - 1,
            "actors": len(self.shards),
            "shards": [[list(c) for c in s] for s in self.shards],
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
    def create(cls, exp: Experiment, name: str | None = None) -> ScorerPool:
        """Start the pool (loading starts at once; :meth:`ready` waits for it)."""
        cache_dir = str(resolve_cache_dir(exp))
        shards = [s for s in assign_cells(eval_cells(exp.eval), exp.eval.scorers.num_actors) if s]
        _check_resources(exp)
        options: dict[str, Any] = {  # restartable too: its node may be lost mid-sweep
            "num_cpus": 0,
            "max_concurrency": COORDINATOR_THREADS,
            "max_restarts": RESTARTS,
            "max_task_retries": RESTARTS,
        }
        if name is not None:
            if name in list_named_actors():
                raise ValueError(f"scorer pool {name!r} exists already; use ScorerPool.lookup")
            options["name"] = name
        coordinator = ray.remote(_Coordinator).options(**options)
        return cls(coordinator.remote(exp.to_dict(), cache_dir, shards))

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

    def score_async(self, weights: Mapping | ray.ObjectRef, ranks: bool = False) -> ray.ObjectRef:
        """Like :meth:`score`, returning the ObjectRef of its result."""
        if not isinstance(weights, ray.ObjectRef):
            if not isinstance(weights, Mapping):
                raise ValueError("weights: expected a checkpoint dict or an ObjectRef to one")
            weights = ray.put({k: weights[k] for k in ("config", "model") if k in weights})
        return self.coordinator.score.remote([weights], ranks)  # boxed: workers resolve it

    def score(self, weights: Mapping | ray.ObjectRef) -> dict[str, float]:
        """Flat clean/*, corrupt/<c>/s<k>/*, agg/* of a checkpoint dict (or a ref to one)."""
        return _get(self.score_async(weights))

    def score_with_ranks(
        self, weights: Mapping | ray.ObjectRef
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """:meth:`score`, and every cell's per-query ranks (:func:`flat_ranks`) with each
        caption's image under ``OWNERS`` (so a bootstrap can draw a caption with its image)."""
        return _get(self.score_async(weights, ranks=True))

    def score_file(self, path: str | Path) -> dict[str, float]:
        return self.score(load_checkpoint(Path(path)))

    def shutdown(self) -> None:
        _get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)


def _get(ref: ray.ObjectRef | list[ray.ObjectRef]) -> Any:
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


def score_checkpoint(
    exp: Experiment, blob: Mapping[str, Any], progress: bool = True
) -> tuple[dict[str, float], dict[str, Any]]:
    """``clipray score``: validate everything, then score ``blob`` on a pool (starting a local
    Ray if none is up). Returns (flat result, pool info); bad input writes nothing and starts
    no actor."""
    from tqdm import tqdm

    resolve_cache_dir(exp)
    eval_cells(exp.eval)
    build_weights_model(blob, exp.model.name)  # fits the architecture?
    load_eval_set(exp)  # every image readable (the pool loads it again where it runs)
    sc = exp.eval.scorers
    if sc.gpus_per_actor > 0 and not ray.is_initialized() and not torch.cuda.is_available():
        raise ValueError("eval.scorers.gpus_per_actor: > 0 but no CUDA device is visible")
    started = not ray.is_initialized()
    if started:
        cpus = max(1, math.ceil(sc.num_actors * sc.cpus_per_actor))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    pool = None
    try:
        pool = ScorerPool.create(exp)
        ready = pool.coordinator.ready.remote()
        with tqdm(total=len(eval_cells(exp.eval)), desc="cells", disable=not progress) as bar:
            while not ray.wait([ready], timeout=0.5)[0]:
                if (done := pool.progress()[0]) > bar.n:
                    bar.update(done - bar.n)
            _get(ready)
            bar.update(bar.total - bar.n)
        return pool.score(blob), pool.stats()
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
