"""Shared fixtures: small experiments on the real tiny models and the real synthetic data."""

from __future__ import annotations

import pytest
import torch

from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment

torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared machine


def small_experiment(*overrides: str) -> Experiment:
    """The default experiment shrunk so a training run takes a second or two."""
    base = [
        "data.train_size=64",
        "data.val_size=16",
        "data.test_size=16",
        "train.batch_size=16",
        "train.epochs=1",
        "train.warmup_steps=2",
    ]
    return load_experiment(None, base + list(overrides))


@pytest.fixture
def small_exp() -> Experiment:
    return small_experiment()
