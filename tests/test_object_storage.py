"""Shards in a bucket (``s3://``): a real S3 API server (moto's) on 127.0.0.1 holds them, and
pyarrow's S3 filesystem reaches it through ``AWS_ENDPOINT_URL``, as it reaches any S3-compatible
store (MinIO, Ceph, R2). Training streams from the bucket with either loader (decode processes,
Ray Data tasks in other processes, which inherit the endpoint through Ray's workers), the eval
splits load from it, and a bucket that is missing or unreachable is one line before training."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch

from clipray.cli.main import main
from clipray.core.datacheck import check_dataset
from clipray.core.trainer import NoHooks, build_trainer
from clipray.sweep.ingest import ray_data_batches
from tests.e2e import free_port
from tests.test_ingest import _ids
from tests.test_webdataset import _shards, _spec, _wd

pytestmark = pytest.mark.slow
BUCKET = "clipray-shards"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 with an empty bucket; this module's processes (and the Ray
    workers started here) reach it as they would reach AWS."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    _wait_for(endpoint, server)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from pyarrow import fs

        fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield endpoint
        ray.shutdown()
    server.terminate()
    server.wait(timeout=30)


def _wait_for(endpoint: str, server: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the S3 server did not come up")
            time.sleep(0.3)


def _upload(local: Path, prefix: str) -> str:
    """Every file under ``local`` into the bucket under ``prefix``; the bucket URI of it."""
    from pyarrow import fs

    bucket = fs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    for path in sorted(local.rglob("*")):
        if path.is_file():
            with bucket.open_output_stream(f"{BUCKET}/{prefix}/{path.relative_to(local)}") as f:
                f.write(path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def test_training_streams_from_a_bucket_and_evaluates_from_it(s3, tmp_path):
    _wd(tmp_path)  # writes tmp_path/ds: train/, val/, test/
    uri = _upload(tmp_path / "ds", "ds")
    exp = _wd(
        tmp_path,
        f"data.train={uri}/train/{{00000..00003}}.tar",
        f"data.val={uri}/val/00000.tar",
        f"data.test={uri}/test/00000.tar",
        "data.loader_workers=1",
    )
    check_dataset(exp)  # opens the first remote shard
    trainer = build_trainer(exp, torch.device("cpu"))
    trainer.fit(NoHooks())
    last = trainer.history[-1]
    assert last["data/skipped"] == 0 and "val/rsum" in last and trainer.step == 4


def test_ray_data_tasks_read_the_bucket(s3, tmp_path):
    local = _shards(tmp_path, n=32, per_shard=8)
    uri = _upload(Path(local[0]).parent, "ids")
    spec = _spec([f"{uri}/{Path(s).name}" for s in local], workers=2)
    seen = [int(t) for b in _first(ray_data_batches(spec, 0, 0, _ids), 8) for t in b.tokens[:, 0]]
    assert sorted(seen) == list(range(32))


def _first(batches, n: int) -> list:
    return [b for _, b in zip(range(n), batches, strict=False)]


@pytest.mark.parametrize(
    "endpoint, message",
    [
        (None, r"data.train: shard not found: s3://no-such-bucket/"),
        ("http://127.0.0.1:{closed}", r"data.train: s3://no-such-bucket/.*cannot be read"),
    ],
    ids=["missing-bucket", "unreachable"],
)
def test_a_missing_or_unreachable_bucket_is_one_line(
    s3, tmp_path, capsys, monkeypatch, endpoint, message
):
    exp = _wd(tmp_path)
    if endpoint is not None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.format(closed=free_port()))
    over = [
        "data.kind=webdataset", "data.train=s3://no-such-bucket/cc3m/{00000..00002}.tar",
        "data.train_samples=64", f"data.val={exp.data.val}", "data.loader_workers=0",
    ]  # fmt: skip
    out = tmp_path / "run"
    code = main(["train", "--quiet", "--out", str(out), *[a for o in over for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and err.count("\n") == 1
    assert re.search(message, err), err
