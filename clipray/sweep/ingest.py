"""Training batches from WebDataset shards through Ray Data, for the ranks of a sweep's trials.

Each rank of a Ray Train run builds, per pass over its shards, a Ray Dataset of its share of
the epoch's shards (the same share and order as :mod:`clipray.core.stream`: a function of
``(seed, epoch, pass, rank, world)``). Ray Data runs the reading, JPEG decoding, resizing and
tokenizing as tasks on any node's CPUs (``data.loader_workers`` of them per rank, one CPU
each), streams the decoded rows to the rank with bounded memory, and prefetches batches while
the rank trains. The rank only mixes rows in a seeded shuffle buffer and takes whole batches.

Why a dataset per rank and not one dataset split by Ray Train (``get_dataset_shard``): a split
dataset re-executes once per epoch with a shuffle seed drawn from its execution count, which a
restarted run counts from zero again; here the order stays a function of ``(seed, epoch)``
across restarts, so resuming is exact (at an epoch boundary for free, mid-epoch by replaying
the epoch's stream and dropping the batches already trained on, as the process loader does).

Damaged samples (undecodable image, no caption) come through as rows flagged not ``ok`` and
are counted here, so the trainer logs them per epoch and stops past ``data.max_skip_fraction``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import numpy as np
import ray
import torch

from clipray.config.schema import Experiment, WebDatasetData
from clipray.core.shards import guarded, iter_raw
from clipray.core.stream import Batch, StreamSpec, decode, rank_shards

ROWS_PER_BLOCK = 256  # decoded rows a read task hands on at a time: bounded memory per task
PREFETCH_BATCHES = 2
QUIET = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}


def decode_tasks(exp: Experiment) -> int:
    """Ray Data decode tasks (one CPU each, outside the rank's own reservation) per rank of
    ``exp``'s training; 0: the rank decodes itself (in memory, or in processes)."""
    data = exp.data
    if isinstance(data, WebDatasetData) and data.ingest == "ray_data":
        return _tasks(data.loader_workers)
    return 0


def _tasks(loader_workers: int) -> int:
    return max(1, loader_workers)  # 0 means "on the training thread": here, one task


def ray_data_batches(
    spec: StreamSpec, epoch: int, first: int, tokenize: Callable[[list[str]], Any]
) -> Iterator[Batch]:
    """Batches ``first, first + 1, ...`` of ``epoch`` for this rank (endless: the caller stops,
    and must close this generator: see :func:`_epoch_rows`)."""
    images: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    skipped, index = 0, 0
    with closing(_epoch_rows(spec, epoch, tokenize)) as rows:
        for block in rows:
            ok = block["ok"]
            skipped += int((~ok).sum())
            images.append(block["image"][ok])
            tokens.append(block["tokens"][ok])
            while sum(len(i) for i in images) >= spec.batch:
                batch_images, images = _take(images, spec.batch)
                batch_tokens, tokens = _take(tokens, spec.batch)
                if index >= first:
                    yield Batch(torch.from_numpy(batch_images), torch.tensor(batch_tokens), skipped)
                index, skipped = index + 1, 0


def _epoch_rows(
    spec: StreamSpec, epoch: int, tokenize: Callable[[list[str]], Any]
) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's rows, pass after pass. Each pass's Ray Data iterator is closed the moment
    its consumer stops: an executor left to the garbage collector keeps its tasks' CPUs for a
    while, and the next epoch's tasks would wait for them (with every CPU taken, forever)."""
    for pass_ in itertools.count():
        with closing(_pass_rows(spec, epoch, pass_, tokenize)) as rows:
            yield from rows


def _take(parts: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first ``n`` rows of the concatenated ``parts``, and the rest."""
    joined = np.concatenate(parts)
    return joined[:n], [joined[n:]]


def _pass_rows(
    spec: StreamSpec, epoch: int, pass_: int, tokenize: Callable[[list[str]], Any]
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's rows of one pass: read and decoded by Ray Data tasks, mixed in the seeded
    shuffle buffer (drained at the end of the pass, like the process loader's)."""
    shards = rank_shards(spec, epoch, pass_)
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds.context.execution_options.preserve_order = True  # rows in shard order: deterministic
    ds.context.enable_progress_bars = False
    for name, level in QUIET.items():  # a few lines per dataset (one per pass) otherwise
        logging.getLogger(name).setLevel(level)
    ds = ds.map_batches(
        _decode_shards,
        fn_kwargs={"size": spec.size, "field": spec.caption_field, "tokenize": tokenize},
        batch_size=1,  # one shard per call
        compute=ray.data.TaskPoolStrategy(size=_tasks(spec.workers)),
        num_cpus=1,
    )
    seed = int(np.random.SeedSequence([spec.seed, epoch, spec.rank, pass_]).generate_state(1)[0])
    batches = iter(
        ds.iter_batches(
            batch_size=spec.batch,
            batch_format="numpy",
            prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=spec.shuffle_buffer,
            local_shuffle_seed=seed,
        )
    )
    with closing(batches):  # type: ignore[arg-type]  # a generator; closing shuts the executor
        yield from batches


def _decode_shards(
    batch: dict[str, np.ndarray],
    size: int,
    field: str | None,
    tokenize: Callable[[list[str]], Any],
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard paths in, decoded + tokenized rows out (damaged ones not ``ok``)."""
    for shard in batch["shard"]:
        rows: list[tuple[np.ndarray, str] | None] = []
        for _, raw in guarded(str(shard), iter_raw(str(shard))):
            rows.append(decode(raw, size, field))
            if len(rows) == ROWS_PER_BLOCK:
                yield _block(rows, size, tokenize)
                rows = []
        if rows:
            yield _block(rows, size, tokenize)


def _block(
    rows: list[tuple[np.ndarray, str] | None], size: int, tokenize: Callable[[list[str]], Any]
) -> dict[str, np.ndarray]:
    blank = np.zeros((size, size, 3), np.uint8)
    images = np.stack([r[0] if r is not None else blank for r in rows])
    captions = [r[1] if r is not None else "" for r in rows]
    ok = np.array([r is not None for r in rows])
    return {"image": images, "tokens": np.asarray(tokenize(captions)), "ok": ok}
