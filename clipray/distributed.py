"""One trial's training as a Ray Train ``TorchTrainer`` run (DDP over CPU or GPU workers).

Each worker runs the same :class:`clipray.train.Trainer` loop as ``clipray train``; Ray Train
sets up ``torch.distributed`` (gloo on CPU, NCCL on GPU) and the loop picks it up. Rank 0 reports
every checkpoint (full training state, one file) with its metrics; a restarted worker group, or a
re-run of the same trial after a crash, continues from the run's latest checkpoint because the Train
run is named after the trial and lives on the sweep's storage.

Per-checkpoint metrics go live to the trial's MLflow run (a controller-side callback, which only
logs steps the run does not have yet) and to Ray Tune (for the trial table and ASHA).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from clipray.config import Experiment, experiment_from_dict, torch_threads
from clipray.loss import Ranks
from clipray.tracking import Tracking, log_metrics, metric_steps
from clipray.train import build_trainer, load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"
LOSS_KEY = "train/loss"  # every report has it: the key used to see which steps MLflow holds


class _ReportHooks:
    """Trainer hooks on a Ray Train worker: every rank reports, rank 0 attaches the checkpoint."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, metrics: dict[str, float], blob: dict[str, Any] | None) -> None:
        if blob is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CHECKPOINT_FILE, blob)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    exp = experiment_from_dict(config["experiment"])
    ctx = ray.train.get_context()
    ranks = Ranks(ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(config["threads"])
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    trainer = build_trainer(exp, ray.train.torch.get_device(), ranks, resume)
    trainer.fit(_ReportHooks())


class MlflowEpochLogger(UserCallback):
    """Logs each report's metrics to the trial's MLflow run as it arrives (controller side)."""

    def __init__(self, tracking: Tracking, run_id: str):
        self.tracking, self.run_id = tracking, run_id
        self._steps: set[int] | None = None

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        m = metrics[0]
        client = self.tracking.client()
        if self._steps is None:  # what an earlier attempt of this trial already logged
            self._steps = metric_steps(client, self.run_id, LOSS_KEY)
        numeric = {k: v for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        log_metrics(client, self.run_id, numeric, int(m["step"]), self._steps)


def use_gpu(exp: Experiment) -> bool:
    if exp.train.use_gpu == "auto":
        return bool(ray.cluster_resources().get("GPU", 0))
    return exp.train.use_gpu == "yes"


def make_trainer(
    exp: Experiment,
    *,
    name: str,
    storage_path: str,
    tracking: Tracking,
    run_id: str,
    in_tune: bool = True,
) -> TorchTrainer:
    """The trial's TorchTrainer; ``name`` must be stable across restarts (the trial id)."""
    gpu = use_gpu(exp)
    resources = {"CPU": exp.train.cpus_per_worker}  # use_gpu adds one GPU per worker
    callbacks: list[Any] = [MlflowEpochLogger(tracking, run_id)]
    if in_tune:
        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "experiment": exp.to_dict(),
            "threads": torch_threads(exp.train.cpus_per_worker),
        },
        scaling_config=ScalingConfig(
            num_workers=exp.train.num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest + one spare
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO: log files only
        ),
    )


def read_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    """The training-state blob inside a Ray Train checkpoint (local or remote storage)."""
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)
