"""Training batches streamed from WebDataset shards, decoded in worker processes.

The training thread only receives finished batches (uint8 images at the model's resolution and
tokens): reading, JPEG decoding, resizing and tokenizing run in ``data.loader_workers`` torch
DataLoader processes per rank, two batches ahead each. Memory is bounded by the shuffle buffer
and the prefetched batches, never the dataset.

Determinism (for a fixed ``world`` size and ``loader_workers``):

- The shard order of epoch ``e`` is a permutation drawn from ``(seed, e, pass)``; rank ``r`` of
  ``world`` takes every ``world``-th shard of it, worker ``w`` of that rank every ``W``-th of
  those, so within one pass over the shards every rank (and every worker) reads disjoint
  shards. A rank whose share runs out before the epoch's ``steps_per_epoch`` batches starts the
  next pass (a new permutation), so every rank takes the same number of steps (DDP needs it).
- Each worker mixes its samples in a shuffle buffer seeded by ``(seed, e, rank, w)``; the
  DataLoader takes the workers' batches round-robin, so batch ``s`` of epoch ``e`` is a
  function of ``(seed, e, s, rank, world, W)``.
- Resuming at an epoch boundary starts the next epoch's stream: exact and free. Resuming
  mid-epoch (``train.checkpoint_every_steps``) replays the epoch's stream and drops its first
  ``s`` batches: exact, at the cost of reading and decoding them again (not training on them).
- The shuffle buffer is drained at the end of each pass, so when an epoch needs at most one
  pass (``train_samples`` no more than the shards hold, shards a multiple of ``world``) every
  sample is seen at most once per epoch and ranks see disjoint samples.

Damaged samples (an image PIL cannot decode, no caption) are skipped; each batch says how many
were skipped while it was gathered, so the trainer can count them per epoch.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipray.core.data import resize_crop
from clipray.core.shards import Raw, caption_of, guarded, image_bytes, iter_raw


def decode(raw: Raw, size: int, field: str | None) -> tuple[np.ndarray, str] | None:
    """(uint8 ``size x size x 3`` image, caption), or None for a damaged sample."""
    caption, data = caption_of(raw, field), image_bytes(raw)
    if caption is None or data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale >= size
            return resize_crop(im.convert("RGB"), size), caption
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged images
        return None


def epoch_shards(shards: list[str], seed: int, epoch: int, pass_: int) -> list[str]:
    """The order in which the shards of ``epoch`` (its ``pass_``-th pass) are read."""
    order = np.random.default_rng([seed, epoch, pass_]).permutation(len(shards))
    return [shards[i] for i in order]


@dataclass
class Batch:
    images: torch.Tensor  # uint8 B x H x W x 3
    tokens: torch.Tensor
    skipped: int  # damaged samples skipped while this batch was gathered


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's stream reads; plain values, so it pickles into worker processes."""

    shards: list[str]
    seed: int
    rank: int
    world: int
    batch: int  # per rank
    size: int
    caption_field: str | None
    shuffle_buffer: int
    workers: int  # decode processes; 0: in the calling thread


def stream_workers(spec: StreamSpec) -> int:
    """Decode processes actually used: each needs at least one shard of its rank's share."""
    share = max(1, len(spec.shards) // spec.world)
    return min(spec.workers, share)


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank: an endless sequence of :class:`Batch` (the caller stops it)."""

    def __init__(self, spec: StreamSpec, epoch: int, tokenize: Callable[[list[str]], Any]):
        self.spec, self.epoch, self.tokenize = spec, epoch, tokenize

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        s = self.spec
        images, captions, skipped = [], [], 0
        for item in self._shuffled(worker, count):
            if item is None:
                skipped += 1
                continue
            images.append(item[0])
            captions.append(item[1])
            if len(images) == s.batch:
                yield Batch(torch.from_numpy(np.stack(images)), self.tokenize(captions), skipped)
                images, captions, skipped = [], [], 0

    def _shuffled(self, worker: int, count: int) -> Iterator[tuple[np.ndarray, str] | None]:
        """Decoded samples through the shuffle buffer (None: a damaged one), the buffer drained
        at the end of each pass so a pass's samples never mix with the next pass's."""
        s = self.spec
        rng = np.random.default_rng([s.seed, self.epoch, s.rank, worker])
        buffer: list[tuple[np.ndarray, str]] = []
        for pass_ in range(1_000_000):  # ends when the caller has its steps
            for raw in self._samples(pass_, worker, count):
                item = decode(raw, s.size, s.caption_field)
                if item is None:
                    yield None
                    continue
                buffer.append(item)
                if len(buffer) >= s.shuffle_buffer:
                    yield _take(buffer, rng)
            while buffer:
                yield _take(buffer, rng)

    def _samples(self, pass_: int, worker: int, count: int) -> Iterator[Raw]:
        for shard in rank_shards(self.spec, self.epoch, pass_)[worker::count]:
            for _, raw in guarded(shard, iter_raw(shard)):
                yield raw


def rank_shards(spec: StreamSpec, epoch: int, pass_: int) -> list[str]:
    """The shards rank ``spec.rank`` reads in pass ``pass_`` of ``epoch``, in order."""
    mine = epoch_shards(spec.shards, spec.seed, epoch, pass_)[spec.rank :: spec.world]
    if not mine:
        raise ValueError(f"rank {spec.rank}: no shard to read ({len(spec.shards)} shards)")
    return mine


def _take(buffer: list, rng: np.random.Generator) -> Any:
    """A random element of ``buffer``, removed in O(1) (swapped with the last)."""
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


# (spec, epoch, first batch, tokenize) -> batches first, first + 1, ... of that epoch
BatchSource = Callable[[StreamSpec, int, int, Callable[[list[str]], Any]], Iterator[Batch]]


def epoch_batches(
    spec: StreamSpec, epoch: int, first: int, tokenize: Callable[[list[str]], Any]
) -> Iterator[Batch]:
    """Batches ``first, first + 1, ...`` of ``epoch`` for this rank (mid-epoch resume replays
    and drops the first ``first``)."""
    workers = stream_workers(spec)
    loader = torch.utils.data.DataLoader(
        ShardStream(spec, epoch, tokenize),
        batch_size=None,  # workers make whole batches
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        collate_fn=_identity,
    )
    for i, batch in enumerate(loader):
        if i >= first:
            yield batch


def _identity(batch: Batch) -> Batch:
    return batch
