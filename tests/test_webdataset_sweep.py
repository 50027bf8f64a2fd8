"""A sweep that pretrains from WebDataset shards through Ray Data, end to end: ``clipray data``
writes the shards, ``clipray sweep`` (a real subprocess with its own Ray) trains each trial with
Ray Train ranks fed by Ray Data decode tasks, scores it, and logs the data metrics (damaged
samples, waiting for data) to a real MLflow server; the console stays free of Ray Data's own
per-dataset lines."""

from __future__ import annotations

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from clipray.cli.main import main
from tests.e2e import BIN, child_runs

pytestmark = pytest.mark.slow


def test_a_sweep_trains_from_shards_through_ray_data(tmp_path, mlflow_server):
    sizes = ["data.train_size=512", "data.val_size=64", "data.test_size=64"]
    write = ["data", "--format", "webdataset", "--per-shard", "128", "--out", str(tmp_path / "ds")]
    assert main([*write, *[a for s in sizes for a in ("--set", s)]]) == 0
    ds = tmp_path / "ds"
    sets = [
        "name=wd",
        f"storage={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_server}",
        "data.kind=webdataset",
        f"data.train={ds}/train/{{00000..00003}}.tar",
        "data.train_samples=512",
        f"data.val={ds}/val/00000.tar",
        f"data.test={ds}/test/00000.tar",
        "data.ingest=ray_data",
        "data.loader_workers=1",
        "train.cpus_per_worker=0.5",
        "train.batch_size=32",
        "train.epochs=2",
        "sweep.num_samples=2",
        "eval.corruptions=[fog]",
        "eval.severities=[1]",
        f"eval.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip  (2 CPUs: pool 2 x 0.2 + trial 0.1 + rank 0.5 + 1 decode task)
    command = [str(BIN / "clipray"), "sweep", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "finished: 2 trials" in done.stdout
    assert "Starting execution of Dataset" not in out and "Progress bars" not in out
    client = MlflowClient(mlflow_server)
    runs = child_runs(client)
    assert len(runs) == 2
    for run in runs:
        skipped = client.get_metric_history(run.info.run_id, "data/skipped")
        assert [m.step for m in skipped] == [16, 32] and all(m.value == 0 for m in skipped)
        wait = client.get_metric_history(run.info.run_id, "time/data_wait_fraction")
        assert len(wait) == 2 and all(0 <= m.value < 1 for m in wait)
