"""A run's data, checked before anything is written or started: what ``clipray check``,
``clipray train`` and a sweep's pre-flight refuse, so a bad image or caption never fails a
run halfway (after its config is written, after a whole epoch, in every trial of a sweep).

Cost: the validation split and the scored split are decoded whole (they are read whole every
epoch and by the scorers anyway; a JPEG is decoded at reduced scale, which still reads every
byte of its stream). A training split is decoded whole up to ``FULL_CHECK`` images; a larger one
has every image's header read and ``SAMPLE_CHECK`` evenly spaced images decoded, so a damaged
file among the rest is still found only when training reaches it.
"""

from __future__ import annotations

from clipray.config.schema import Experiment, SyntheticData
from clipray.core.data import check_images, load_split

FULL_CHECK = 2048  # a training split up to this many images is decoded whole
SAMPLE_CHECK = 256  # a larger one: every header, and this many images (evenly spaced) decoded


def check_dataset(exp: Experiment, batch_size: int | None = None) -> None:
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
