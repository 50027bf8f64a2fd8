"""Training under Ray Train: DDP over 2 CPU workers (gloo) equals one process on the global batch.

Checked on one machine and across 2 simulated nodes (``ray.cluster_utils.Cluster``). Each worker
builds the real Trainer (DDP-wrapped objective), takes its half of step 0's global batch, and
writes the loss and the all-reduced gradients; the test compares them with a single process that
sees the whole batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clipray.config.loading import experiment_from_dict
from clipray.core.contrastive import Ranks
from clipray.core.trainer import build_trainer
from clipray.sweep.ray_train import make_trainer, read_checkpoint
from tests.conftest import small_experiment

pytestmark = pytest.mark.slow  # every test here runs a real Ray runtime and DDP end to end


def _grads_of_step0(exp_dict: dict, ranks: Ranks) -> tuple[float, dict[str, torch.Tensor]]:
    exp = experiment_from_dict(exp_dict)
    trainer = build_trainer(exp, torch.device("cpu"), ranks)
    images, tokens = trainer.batch(trainer.plan(0), 0)
    out = trainer.wrapped(trainer.clip.normalize(images), tokens)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in trainer.clip.model.named_parameters()}
    return float(out["clean_loss"]), grads


def _worker(config: dict) -> None:
    import ray.train

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    ranks = Ranks(ctx.get_world_rank(), ctx.get_world_size())
    assert ranks == Ranks.current()  # Ray Train set up torch.distributed for the loop
    loss, grads = _grads_of_step0(config["experiment"], ranks)
    torch.save({"loss": loss, "grads": grads}, Path(config["out"]) / f"rank{ranks.rank}.pt")


def _run_ddp(exp_dict: dict, out: Path, storage: Path) -> list[dict]:
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"experiment": exp_dict, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ddp-check", storage_path=str(storage)),
    )
    trainer.fit()
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def _check_against_single_process(results: list[dict], exp_dict: dict, local_loss: bool) -> None:
    reference_loss, reference_grads = _grads_of_step0(exp_dict, Ranks())
    if not local_loss:
        assert results[0]["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert results[1]["loss"] == pytest.approx(reference_loss, rel=1e-5)
    else:  # each rank scores its own rows; their mean is the global loss
        mean = (results[0]["loss"] + results[1]["loss"]) / 2
        assert mean == pytest.approx(reference_loss, rel=1e-5)
    for name, ref in reference_grads.items():
        for r in results:  # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def _descendants(root: int) -> set[int]:
    """Every process below ``root`` (read from /proc): the workers of this process's runtime."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_two_workers_give_the_single_process_loss_and_gradients(ray_runtime, tmp_path):
    exp = small_experiment("train.num_workers=2").to_dict()
    results = _run_ddp(exp, tmp_path, tmp_path / "storage")
    _check_against_single_process(results, exp, local_loss=False)


def test_local_loss_mean_is_the_global_loss(ray_runtime, tmp_path):
    exp = small_experiment("train.num_workers=2", "train.local_loss=true").to_dict()
    results = _run_ddp(exp, tmp_path, tmp_path / "storage")
    reference_loss, _ = _grads_of_step0(exp, Ranks())
    assert (results[0]["loss"] + results[1]["loss"]) / 2 == pytest.approx(reference_loss, rel=1e-5)


def test_a_killed_worker_restarts_from_the_latest_checkpoint(ray_runtime, tmp_path):
    """SIGKILL the Train worker once a checkpoint is registered: Ray Train's failure config
    restarts the worker group, which continues from that checkpoint to the same end.

    A checkpoint on disk is registered once the next one appears: a worker cannot hand in a
    report before the controller has taken the previous one."""
    exp = small_experiment(  # not TINY's size: long enough (128 steps) to be killed mid-run
        "data.train_size=1024",
        "train.batch_size=32",
        "train.epochs=4",
        "train.max_failures=1",
        "train.cpus_per_worker=1",
    )
    trainer = make_trainer(exp, name="failing", storage_path=str(tmp_path), report_to_tune=False)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()))
    thread.start()
    deadline = time.time() + 180
    while len(list(tmp_path.glob("failing/checkpoint_*"))) < 2:
        assert time.time() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.1)
    pids = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True)
    ours = _descendants(os.getpid())  # a shared machine may run other people's Ray Train
    victims = [int(p) for p in pids.stdout.split() if int(p) in ours]
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert "result" in outcome, "training did not recover"
    blob = read_checkpoint(outcome["result"].checkpoint)
    per_epoch = 1024 // 32
    assert blob["step"] == 4 * per_epoch
    steps = [h["step"] for h in blob["history"]]
    assert steps == [e * per_epoch for e in (1, 2, 3, 4)]  # nothing lost, nothing repeated
    resumed = [
        h["train/resumed_from_step"] for h in blob["history"] if "train/resumed_from_step" in h
    ]
    assert resumed and resumed[0] >= per_epoch  # it continued; it did not start over


def test_two_simulated_nodes_give_the_single_process_loss_and_gradients(tmp_path):
    """The module's last test: it ends the module's shared runtime (``ray_runtime``, whose
    teardown then has nothing left to shut down) and brings its own multi-node one."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        exp = small_experiment("train.num_workers=2").to_dict()
        results = _run_ddp(exp, tmp_path, tmp_path / "storage")  # one worker per node
        _check_against_single_process(results, exp, local_loss=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
