"""Faults a long sweep meets, survived with real processes: the sweep driver SIGKILLed at several
moments (each resumed), with AWS key variables in its environment that must reach no file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from tests.e2e import BIN, MlflowServer, Sweep, child_runs, tiny_sweep

pytestmark = pytest.mark.slow

SECRETS = {  # fake keys with values that cannot occur by chance
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID7QX3ZV9",
    "AWS_SECRET_ACCESS_KEY": "fake/Secret+Key9f3c1e7a5b2d4c6e8f0a1b3c5d7e9f",
    "AWS_SESSION_TOKEN": "FakeSessionToken0d9c8b7a6e5f4d3c2b1a",
}
TRIALS, EPOCHS, STEPS_PER_EPOCH = 3, 2, 256 // 32


def _scores(client: MlflowClient) -> dict[str, dict[str, float]]:
    """Final scores of every scored trial run, by trial id."""
    return {
        r.data.tags["clipray.trial_id"]: {
            k: v for k, v in r.data.metrics.items() if k.startswith(("clean/", "corrupt/", "agg/"))
        }
        for r in child_runs(client)
        if "clean/rsum" in r.data.metrics
    }


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal score dicts, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def _files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {s[:8]}..." for s in secrets if s.encode() in data]
    return found


def test_a_sweep_killed_three_times_resumes_to_exactly_its_trials_and_writes_no_secret(
    tmp_path, mlflow_server
):
    """One sweep, SIGKILLed (1) while a trial's first checkpoint is being written, (2) after a
    trial's training, while it is scored, (3) two seconds after a trial finished (the next one
    has just opened its MLflow run); each time resumed; then run to the end."""
    client = MlflowClient(mlflow_server)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_LOGGER_LEVEL", None)
    command = tiny_sweep(
        tmp_path,
        "name=faults",
        f"storage={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_server}",
        f"sweep.num_samples={TRIALS}",
        "data.train_size=256",
        f"train.epochs={EPOCHS}",
    )
    train_dir = tmp_path / "runs" / "faults" / "train"
    last_step = EPOCHS * STEPS_PER_EPOCH
    finished_before: dict[str, dict[str, float]] = {}
    sweep = None
    try:
        # 1. While the first checkpoint of a trial is being written.
        sweep = Sweep(command, tmp_path, env)
        sweep.kill_when(lambda: any(train_dir.glob("*/checkpoint_*")), "a checkpoint")

        # 2. A trial has trained all epochs, and its scores are not logged yet.
        def training_done_not_scored() -> bool:
            for run in child_runs(client):
                steps = client.get_metric_history(run.info.run_id, "train/loss")
                if any(m.step == last_step for m in steps) and "clean/rsum" not in run.data.metrics:
                    return True
            return False

        sweep = Sweep([*command, "--resume"], tmp_path, env)
        sweep.kill_when(training_done_not_scored, "a trial being scored")
        finished_before.update(_scores(client))
        # 3. Two seconds after a trial is done: the next trial has just started.
        sweep = Sweep([*command, "--resume"], tmp_path, env)
        done_at: list[float] = []

        def after_a_trial_is_done() -> bool:
            if not done_at and any(" done: " in line for line in sweep.lines):
                done_at.append(time.time())
            return bool(done_at) and time.time() > done_at[0] + 2

        sweep.kill_when(after_a_trial_is_done, "the end of a trial")
        finished_before.update(_scores(client))
        # 4. To the end.
        sweep = Sweep([*command, "--resume"], tmp_path, env)
        out = sweep.finish()
        assert sweep.proc.returncode == 0, out[-4000:]
        assert f"finished: {TRIALS} trials" in out, out[-4000:]
        assert "AWS_SECRET_ACCESS_KEY" in out and "prefer instance roles" in out  # warned

        exp_id = client.get_experiment_by_name("clipray").experiment_id
        parents = [r for r in client.search_runs([exp_id]) if "clipray.sweep_id" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = child_runs(client)
        ids = [r.data.tags["clipray.trial_id"] for r in children]
        assert len(children) == TRIALS and len(set(ids)) == TRIALS, ids  # no phantom, no repeat
        expected = [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
        for run in children:
            assert run.info.status == "FINISHED"
            for key in ("train/loss", "val/rsum"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                assert steps == expected, (run.info.run_name, key, steps)  # no gap, no repeat
            history = client.get_metric_history(run.info.run_id, "clean/rsum")
            assert len(history) == 1, (run.info.run_name, history)  # scores logged once
        after = _scores(client)
        assert finished_before and all(  # NaN (a relative mCE against an undegraded cell) too
            _same(after[t], s) for t, s in finished_before.items()
        )
        sweep_dir = tmp_path / "runs" / "faults"
        assert len((sweep_dir / "results.csv").read_text().splitlines()) == 1 + TRIALS
        grid = tune.ExperimentAnalysis(str(sweep_dir))
        assert len(grid.trials) == TRIALS and all(t.status == "TERMINATED" for t in grid.trials)
        # The keys reached no file: storage, the MLflow store and artifacts, Ray's sessions.
        secrets = [SECRETS["AWS_SECRET_ACCESS_KEY"], SECRETS["AWS_SESSION_TOKEN"]]
        leaks = _files_holding([tmp_path, ray_tmp], secrets)
        assert not leaks, leaks
    finally:
        if sweep is not None and sweep.proc.poll() is None:
            sweep.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_node_lost_mid_trial_continues_the_trial_from_its_checkpoint_elsewhere(tmp_path):
    """A 3-node cluster (the head too small for a Train worker); the node running the trial's
    Train worker is removed after its first epoch: the trial continues from that checkpoint on
    the other node and the sweep finishes."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    db = tmp_path / "mlflow.db"
    command = tiny_sweep(
        tmp_path,
        "name=node-loss",
        f"storage={tmp_path / 'runs'}",  # one filesystem: every simulated node reaches it
        f"tracking.uri=sqlite:///{db}",
        "sweep.num_samples=1",
        "data.train_size=256",
        "train.epochs=3",
    )
    sweep = None
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        sweep = Sweep(command, tmp_path, {**os.environ, "RAY_ADDRESS": cluster.address})
        client = MlflowClient(f"sqlite:///{db}")

        def first_epoch_logged() -> bool:
            runs = child_runs(client) if db.exists() else []
            return bool(runs) and any(
                m.step == STEPS_PER_EPOCH
                for m in client.get_metric_history(runs[0].info.run_id, "train/loss")
            )

        sweep.wait_for(first_epoch_logged, "first epoch logged")
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        (worker,) = list_actors(filters=alive)
        (lost,) = [n for n in nodes if n.node_id == worker.node_id]
        cluster.remove_node(lost)
        out = sweep.finish()
        assert sweep.proc.returncode == 0, out[-4000:]
        assert "finished: 1 trial" in out, out[-4000:]
        (run,) = child_runs(client)
        assert run.info.status == "FINISHED" and "clean/rsum" in run.data.metrics
        assert run.data.metrics["train/resumed_from_step"] >= STEPS_PER_EPOCH  # not from zero
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == [STEPS_PER_EPOCH * e for e in (1, 2, 3)], steps
    finally:
        if sweep is not None and sweep.proc.poll() is None:
            sweep.kill()
        ray.shutdown()
        cluster.shutdown()


def test_the_mlflow_server_down_for_30_seconds_mid_sweep_loses_nothing(tmp_path):
    """The tracking server stops during a trial's training and comes back 30 s later: MLflow's
    client retries every request (7 retries, exponential backoff: about two minutes), so the
    sweep goes on and every run ends with all its metrics."""
    server = MlflowServer(tmp_path).start()
    uri = server.uri
    command = tiny_sweep(
        tmp_path,
        "name=outage",
        f"storage={tmp_path / 'runs'}",
        f"tracking.uri={uri}",
        "sweep.num_samples=2",
        "data.train_size=256",
        f"train.epochs={EPOCHS}",
    )
    sweep = None
    try:
        client = MlflowClient(uri)
        sweep = Sweep(command, tmp_path, dict(os.environ))

        def first_epoch_logged() -> bool:
            runs = child_runs(client)
            history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
            return any(m.step == STEPS_PER_EPOCH for m in history)

        sweep.wait_for(first_epoch_logged, "first epoch logged")
        server.stop()
        time.sleep(30)
        server.start()
        out = sweep.finish()
        assert sweep.proc.returncode == 0, out[-4000:]
        assert "finished: 2 trials" in out, out[-4000:]
        children = child_runs(client)
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for run in children:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/rsum"))
            assert steps == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)], steps
            assert "agg/mean_corrupted_rsum" in run.data.metrics
    finally:
        if sweep is not None and sweep.proc.poll() is None:
            sweep.kill()
        server.stop()


class Filler:
    """Keeps a filesystem full: writes zeros into one file whenever any space frees up, until
    stopped (a crashed trial's cleanup must not give the sweep room again)."""

    def __init__(self, directory: Path):
        self.path, self.stop = directory / "filler", threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)

    def _fill(self) -> None:
        chunk = bytes(1 << 16)
        with open(self.path, "wb") as f:
            while not self.stop.is_set():
                try:
                    f.write(chunk)
                    f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    time.sleep(0.02)

    def __enter__(self) -> Filler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.path.unlink(missing_ok=True)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="mounts a small filesystem: needs root (CI runs as root)"
)
def test_storage_filling_up_mid_sweep_stops_it_clearly_and_it_resumes_later(tmp_path):
    """The sweep's storage (its own small tmpfs) fills up during the second trial: the sweep ends
    with one clear line and exit 1, what it finished is intact, and once there is room again
    ``clipray resume`` finishes it (Ray Train's and Tune's records, cut short by the full disk,
    are replaced: the newest loadable checkpoint, the last whole copy of Tune's state)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(storage)], check=True)
    db = tmp_path / "mlflow.db"
    command = tiny_sweep(
        tmp_path,
        "name=full",
        f"storage={storage}",
        f"tracking.uri=sqlite:///{db}",
        "sweep.num_samples=2",
        "data.train_size=256",
        f"train.epochs={EPOCHS}",
    )
    sweep = None
    try:
        client = MlflowClient(f"sqlite:///{db}")
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}  # its own Ray, whatever else runs
        sweep = Sweep(command, tmp_path, env)
        train = storage / "full" / "train"  # the second trial's first checkpoint is written
        sweep.wait_for(
            lambda: len({p.parent for p in train.glob("*/checkpoint_*")}) >= 2, "trial 2"
        )
        with Filler(storage):
            out = sweep.finish()
        assert sweep.proc.returncode == 1, out[-4000:]
        (stopped,) = [line for line in out.splitlines() if line.startswith("clipray: stopped:")]
        assert 'bin/clipray", line' not in out, out[-4000:]  # no traceback of the command itself
        assert "no space left" in stopped.lower(), stopped
        assert f"clipray resume {storage / 'full'}" in stopped, stopped
        (baseline,) = [r for r in child_runs(client) if r.info.run_name.endswith("baseline")]
        assert baseline.info.status == "FINISHED" and "clean/rsum" in baseline.data.metrics
        resumed = subprocess.run(
            [str(BIN / "clipray"), "resume", str(storage / "full")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
        assert "finished: 2 trials" in resumed.stdout
        children = child_runs(client)
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    finally:
        if sweep is not None and sweep.proc.poll() is None:
            sweep.kill()
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
