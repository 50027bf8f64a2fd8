"""Shared pieces: the tiny-config overrides, one torch thread, one trained tiny checkpoint per
run, and the local Ray runtime of the modules that need one. All on the real tiny models and the
real synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment

TINY = (  # a training run of a second or two: 4 steps per epoch on 64 images, small eval splits
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
    "train.batch_size=16",
    "train.warmup_steps=2",
)


def small_experiment(*overrides: str) -> Experiment:
    """The default experiment shrunk by TINY to one epoch; ``overrides`` come last and win."""
    return load_experiment(None, [*TINY, "train.epochs=1", *overrides])


@pytest.fixture
def small_exp() -> Experiment:
    return small_experiment()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription,
    which made training steps an order of magnitude slower when other work was running.
    Session-wide and first, so the fixtures that train (of any scope) run with it too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TrainedCheckpoint(NamedTuple):
    path: Path  # the checkpoint file, as ``save_checkpoint`` wrote it
    blob: dict[str, Any]  # what was saved; shared by every user: copy it before changing it


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TrainedCheckpoint:
    """The tiny default model (``small_experiment()``) trained for its one epoch, saved once per
    test run, for every test that needs a real training checkpoint but not a particular one."""
    from clipray.core.checkpoint import save_checkpoint
    from clipray.core.trainer import NoHooks, build_trainer

    trainer = build_trainer(small_experiment(), torch.device("cpu"))
    trainer.fit(NoHooks())
    blob = trainer.state_dict()
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "checkpoint.pt"
    save_checkpoint(path, blob)
    return TrainedCheckpoint(path, blob)


@pytest.fixture(scope="module")
def ray_runtime():
    """A local 2-CPU Ray runtime for one module, shut down when the module is done.

    Tests that build a multi-node ``ray.cluster_utils.Cluster`` do not use it; each shuts down
    what it starts. ``ray.init`` refuses to run twice, so a runtime left over by another module
    fails here rather than being silently shared."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 for one test; its tracking URI."""
    from tests.e2e import MlflowServer

    server = MlflowServer(tmp_path).start()
    yield server.uri
    server.stop()
