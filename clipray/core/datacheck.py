"""A run's data, checked before anything is written or started: what ``clipray check``,
``clipray train`` and a sweep's pre-flight refuse, so a bad image or caption never fails a
run halfway (after its config is written, after a whole epoch, in every trial of a sweep).

Cost: the validation split and the scored split are decoded whole (they are read whole every
epoch and by the scorers anyway; a JPEG is decoded at reduced scale, which still reads every
byte of its stream). A training split is decoded whole up to ``FULL_CHECK`` images; a larger one
has every image's header read and ``SAMPLE_CHECK`` evenly spaced images decoded, so a damaged
file among the rest is still found only when training reaches it.

A webdataset training set is streamed, never read whole here: its shard list must expand to at
least one shard per rank, every local shard must exist and start as a tar whose first sample has
an image and a caption, and the first shard of a remote (``s3://``, ``gs://``) list is opened.
``clipray check`` is the offline check (``remote=False``): it reaches no bucket, so a config
naming remote shards validates anywhere; ``clipray train`` and a sweep's pre-flight reach it.
The val/test shard sets are read into memory and decoded whole, like any eval split.
"""

from __future__ import annotations

import itertools

from clipray.config.schema import Experiment, SyntheticData, WebDatasetData
from clipray.core.data import check_images, load_split
from clipray.core.shards import caption_of, guarded, image_bytes, is_remote, iter_raw, shard_list

FULL_CHECK = 2048  # a training split up to this many images is decoded whole
SAMPLE_CHECK = 256  # a larger one: every header, and this many images (evenly spaced) decoded


def check_dataset(exp: Experiment, batch_size: int | None = None, remote: bool = True) -> None:
    """What training and scoring will read, checked before anything is written or started.

    The training split holds at least one batch (``batch_size``, default ``train.batch_size``;
    a sweep passes the largest its search space can draw). Files: every table and caption
    parses; every image of the validation split and of the scored split (``eval.split``, first
    ``eval.max_images``) decodes; the training split is decoded whole up to ``FULL_CHECK``
    images, else every header plus ``SAMPLE_CHECK`` evenly spaced images. The synthetic dataset
    is generated, so only its sizes are checked (nothing is generated here).
    """
    batch = exp.train.batch_size if batch_size is None else batch_size
    data = exp.data
    if isinstance(data, SyntheticData):
        if batch > data.train_size:
            raise ValueError(
                f"train.batch_size: {batch} exceeds data.train_size={data.train_size} (one "
                "batch needs that many training images)"
            )
        return
    if isinstance(data, WebDatasetData):
        _check_shards(exp, data, batch, remote)
        return
    train = load_split(data, "train")
    if batch > len(train):
        raise ValueError(
            f"train.batch_size: {batch} exceeds the {len(train)} images of the training split "
            f"({train.name})"
        )
    check_images(train, None if len(train) <= FULL_CHECK else SAMPLE_CHECK)
    val = load_split(data, "val")
    check_images(val)
    if exp.eval.split == "test":
        check_images(load_split(data, "test").subset(exp.eval.max_images))


def _check_shards(exp: Experiment, data: WebDatasetData, batch: int, remote: bool) -> None:
    if batch > data.train_samples:
        raise ValueError(
            f"train.batch_size: {batch} exceeds data.train_samples={data.train_samples}"
        )
    shards = _listed(data.train, "data.train")
    _listed(data.val, "data.val")
    _listed(data.test or [], "data.test")
    if len(shards) < exp.train.num_workers:
        raise ValueError(
            f"data.train: {len(shards)} shards for train.num_workers={exp.train.num_workers} "
            "ranks; each rank needs at least one shard"
        )
    first_remote = next((s for s in shards if is_remote(s)), None)
    for shard in [s for s in shards if not is_remote(s)] + ([first_remote] if remote else []):
        if shard is None:
            continue
        try:
            samples = list(itertools.islice(guarded(shard, iter_raw(shard)), 1))
        except ValueError as e:
            raise ValueError(f"data.train: {e}") from None
        if not samples:
            raise ValueError(f"data.train: {shard}: no samples in this shard")
        key, raw = samples[0]
        if image_bytes(raw) is None or caption_of(raw, data.caption_field) is None:
            what = "a caption" if data.caption_field is None else f".json {data.caption_field!r}"
            raise ValueError(f"data.train: {key}: first sample lacks an image or {what}")
    splits = ["val"] + (["test"] if exp.eval.split == "test" else [])
    for split in splits:
        patterns = getattr(data, split) or data.val
        if remote or not any(is_remote(s) for s in shard_list(patterns)):
            loaded = load_split(data, split)
            check_images(loaded if split == "val" else loaded.subset(exp.eval.max_images))


def _listed(patterns: str | list[str], field: str) -> list[str]:
    try:
        return shard_list(patterns)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
