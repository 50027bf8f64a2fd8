"""Streamed webdataset input inside Ray Train: two DDP workers, each reading its disjoint share
of the shards and decoding it in its own DataLoader process (forked from the Ray Train worker),
train a trial to the end and report the data metrics with each checkpoint."""

from __future__ import annotations

import pytest
import torch

from clipray.sweep.ray_train import make_trainer, read_checkpoint
from tests.test_webdataset import _wd

pytestmark = pytest.mark.slow


def test_two_ray_train_workers_stream_their_shards(ray_runtime, tmp_path):
    exp = _wd(tmp_path, "train.num_workers=2", "train.cpus_per_worker=1", "data.loader_workers=1")
    trainer = make_trainer(exp, name="wd", storage_path=str(tmp_path / "r"), report_to_tune=False)
    blob = read_checkpoint(trainer.fit().checkpoint)
    metrics = blob["history"][-1]
    assert blob["step"] == 64 // 16 and metrics["data/skipped"] == 0
    assert 0 <= metrics["time/data_wait_fraction"] <= 1 and "val/rsum" in metrics
    assert all(torch.isfinite(v).all() for v in blob["model"].values() if v.is_floating_point())
