"""One trial's training as a Ray Train ``TorchTrainer`` run (DDP over CPU or GPU workers).

Each worker runs the same :class:`clipray.core.trainer.Trainer` loop as ``clipray train``; Ray Train
sets up ``torch.distributed`` (gloo on CPU, NCCL on GPU) and the loop picks it up. Rank 0 reports
every checkpoint (full training state, one file) with its metrics; a restarted worker group, or a
re-run of the same trial after a crash, continues from the run's latest checkpoint because the Train
run is named after the trial and lives on the sweep's storage.

Per-checkpoint metrics go live to Ray Tune (the trial table, ASHA), and from there the sweep
driver logs them to the trial's MLflow run. Workers import only what they run: no MLflow, no Tune.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
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

from clipray.config.loading import experiment_from_dict
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.core.checkpoint import load_checkpoint, save_checkpoint
from clipray.core.contrastive import Ranks
from clipray.core.device import torch_threads, wants_gpu
from clipray.core.stream import BatchSource, epoch_batches
from clipray.core.trainer import build_trainer
from clipray.sweep.ingest import decode_tasks, ray_data_batches
from clipray.sweep.ray_worker import quiet_logs

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"  # the blob's per-checkpoint metrics, readable without torch


class _ReportHooks:
    """Trainer hooks on a Ray Train worker: every rank reports, rank 0 attaches the checkpoint;
    after each report, training ends early if the sweep's scheduler left a stop marker."""

    def __init__(self, stop_marker: str | None, ranks: Ranks):
        self.stop_marker, self.ranks = stop_marker, ranks

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, metrics: dict[str, float], blob: dict[str, Any] | None) -> bool:
        if blob is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, blob)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(blob["history"]))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        return stop_requested(self.stop_marker, self.ranks)


def stop_requested(marker: str | None, ranks: Ranks) -> bool:
    """Whether the stop marker exists, as rank 0 sees it (so every rank agrees)."""
    decision = [marker is not None and ranks.rank == 0 and storage.exists(marker)]
    if ranks.world_size > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    return bool(decision[0])


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    quiet_logs()
    exp = experiment_from_dict(config["experiment"])
    ctx = ray.train.get_context()
    ranks = Ranks(ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(config["threads"])
    checkpoint = ray.train.get_checkpoint()
    recovered = checkpoint is None and config.get("resume_path") is not None
    if recovered:  # Ray Train lost its record of this run's checkpoints (see recover_run)
        checkpoint = Checkpoint(config["resume_path"])
    resume = read_checkpoint(checkpoint) if checkpoint is not None else None
    if stop_requested(config.get("stop_marker"), ranks):
        return  # stopped early before a crash; the trial reads its last checkpoint
    device = ray.train.torch.get_device()
    trainer = build_trainer(exp, device, ranks, resume, batch_source(exp))
    hooks = _ReportHooks(config.get("stop_marker"), ranks)
    if recovered and resume is not None:  # report it again, so Ray Train's new record has it
        hooks.on_checkpoint(resume["history"][-1], resume if ranks.rank == 0 else None)
    trainer.fit(hooks)


def batch_source(exp: Experiment) -> BatchSource:
    """How a rank streams a webdataset training set: Ray Data tasks, or decode processes."""
    return ray_data_batches if decode_tasks(exp) else epoch_batches


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def recover_run(storage_path: str, name: str) -> str | None:
    """The newest loadable checkpoint of run ``name`` if Ray Train's record of it is damaged.

    Ray Train rewrites that record in place; storage that fills up mid-write leaves it truncated,
    and Ray then refuses to start the run again (CheckpointManagerInitializationError), so the
    trial could never be resumed. A damaged record is removed; training continues from the
    newest checkpoint that loads (None: from the start)."""
    run = storage.join(storage_path, name)
    record = storage.join(run, SNAPSHOT)
    if not storage.exists(record):
        return None
    try:
        storage.read_json(record)
        return None
    except ValueError:  # not JSON (truncated, empty) or not UTF-8
        storage.remove(record)
    best: tuple[int, str] | None = None
    for entry in storage.listdir(run):
        if entry.startswith("checkpoint_"):
            try:
                step = int(read_checkpoint(Checkpoint(storage.join(run, entry)))["step"])
            except (ValueError, OSError):
                continue  # written only in part
            best = max(best or (step, entry), (step, entry))
    return storage.join(run, best[1]) if best else None


# Orchestration latency (BENCHMARKS.md): Ray Train's controller polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and every report waits for a poll; the
# preemption watcher and metrics exporters are extra actors/threads a trial does not need.
# Ray Train hands its settings from the process that calls fit() to its controller and workers.
TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def make_trainer(
    exp: Experiment,
    *,
    name: str,
    storage_path: str,
    report_to_tune: bool = True,
    stop_marker: str | None = None,
) -> TorchTrainer:
    """The trial's TorchTrainer; ``name`` must be stable across restarts (the trial id).

    Inside a Tune trial every report is forwarded to Tune; outside one, pass
    ``report_to_tune=False``.
    """
    for key, value in TRAIN_ENV.items():  # however Ray was started; a user's own value wins
        os.environ.setdefault(key, value)
    gpu = wants_gpu(exp.train.use_gpu, ray.cluster_resources().get("GPU", 0) > 0)
    resources = {"CPU": exp.train.cpus_per_worker}  # use_gpu adds one GPU per worker
    callbacks: list[Any] = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "experiment": exp.to_dict(),
            "threads": torch_threads(exp.train.cpus_per_worker),
            "stop_marker": stop_marker,
            "resume_path": recover_run(storage_path, name),
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
