"""Streamed webdataset input through Ray Data (what a sweep's ranks use): the same guarantees as
the process loader (order a function of seed and epoch, exact mid-epoch replay, disjoint ranks,
damaged samples counted), and inside Ray Train: two DDP workers each streaming their share, with
either ingest, train a trial to the end and report the data metrics with each checkpoint.

Its own Ray runtime: four logical CPUs on this two-core machine, so two workers and their decode
tasks fit (Ray counts CPUs, it does not measure them)."""

from __future__ import annotations

import itertools
import time
from contextlib import closing

import pytest
import ray
import torch

from clipray.core.trainer import NoHooks, build_trainer
from clipray.sweep.ingest import ray_data_batches
from clipray.sweep.ray_train import make_trainer, read_checkpoint
from tests.test_webdataset import _damaged_shard, _shards, _spec, _wd

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def four_cpus():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ids(captions: list[str]) -> list[list[int]]:
    """A tokenizer stand-in that keeps each sample's number: ``sample 7`` -> [7]."""
    return [[int(c.split()[-1]) if c else -1] for c in captions]


def _seen(spec, epoch: int, steps: int, first: int = 0) -> list[int]:
    batches = ray_data_batches(spec, epoch, first, _ids)
    return [int(t) for b in itertools.islice(batches, steps - first) for t in b.tokens[:, 0]]


def test_order_is_a_function_of_seed_and_epoch_and_replays_exactly(tmp_path):
    spec = _spec(_shards(tmp_path), workers=2)
    a = _seen(spec, epoch=0, steps=6)
    assert a == _seen(spec, epoch=0, steps=6) and len(set(a)) == 24
    assert a != _seen(spec, epoch=1, steps=6)
    assert a != _seen(_spec(spec.shards, seed=1, workers=2), epoch=0, steps=6)
    assert a[8:] == _seen(spec, epoch=0, steps=6, first=2)  # mid-epoch resume: replayed


def test_ranks_read_disjoint_shards_and_passes_continue(tmp_path):
    shards = _shards(tmp_path, n=32, per_shard=8)
    for epoch in (0, 1):
        seen = [_seen(_spec(shards, rank=r, world=2, workers=1), epoch, steps=4) for r in (0, 1)]
        assert len(set(seen[0])) == len(set(seen[1])) == 16  # one pass: each sample once
        assert not set(seen[0]) & set(seen[1])
    two_passes = _seen(_spec(shards, workers=1), 0, steps=12)  # 48 samples from 32: a 2nd pass
    assert len(two_passes) == 48 and set(two_passes) == set(range(32))


def test_a_stream_closed_mid_pass_gives_its_cpus_back(tmp_path):
    """An epoch ends before its pass does; the next epoch's tasks must not wait for the last
    one's (with every CPU held by leftover tasks, they would wait forever)."""
    spec = _spec(_shards(tmp_path, n=64, per_shard=8), workers=2)
    for epoch in range(3):
        with closing(ray_data_batches(spec, epoch, 0, _ids)) as batches:
            assert len(list(itertools.islice(batches, 2))) == 2
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


def test_damaged_samples_are_skipped_and_counted(tmp_path):
    shard = _damaged_shard(tmp_path / "bad.tar")
    batch = next(ray_data_batches(_spec([shard], batch=4, workers=1), 0, 0, _ids))
    assert batch.skipped == 2 and batch.images.shape == (4, 16, 16, 3)
    assert set(batch.tokens[:, 0].tolist()) <= {0, 3, 4, 5}


def test_training_resumed_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    over = ("train.epochs=2", "train.checkpoint_every_steps=3", "data.loader_workers=2")
    straight = build_trainer(_wd(tmp_path, *over), CPU, source=ray_data_batches)
    blobs = []

    class Keep(NoHooks):
        def on_checkpoint(self, metrics, blob):
            blobs.append(blob)
            return False

    straight.fit(Keep())
    mid = next(b for b in blobs if b["step"] == 3)  # inside epoch 0 (4 steps per epoch)
    resumed = build_trainer(_wd(tmp_path, *over), CPU, resume=mid, source=ray_data_batches)
    resumed.fit(NoHooks())
    a, b = straight.clip.model.state_dict(), resumed.clip.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history[-1]["data/skipped"] == 0


@pytest.mark.parametrize("ingest", ["ray_data", "processes"])
def test_two_ray_train_workers_stream_their_shards(tmp_path, ingest):
    exp = _wd(
        tmp_path,
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "data.loader_workers=1",
        f"data.ingest={ingest}",
    )
    trainer = make_trainer(exp, name="wd", storage_path=str(tmp_path / "r"), report_to_tune=False)
    blob = read_checkpoint(trainer.fit().checkpoint)
    metrics = blob["history"][-1]
    assert blob["step"] == 64 // 16 and metrics["data/skipped"] == 0
    assert 0 <= metrics["time/data_wait_fraction"] <= 1 and "val/rsum" in metrics
    assert all(torch.isfinite(v).all() for v in blob["model"].values() if v.is_floating_point())
