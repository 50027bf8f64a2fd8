"""Helpers of the end-to-end tests: ``clipray sweep`` as a real subprocess, a real
``mlflow server`` on 127.0.0.1, and the MLflow runs a sweep leaves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clipray.sweep.tracking import TRIAL_TAG
from tests.conftest import TINY

BIN = Path(sys.executable).parent

TINY_SWEEP = [  # a few seconds per trial: tiny data, one corruption at one severity
    *TINY,  # each sweep sets its own data.train_size, which wins over TINY's
    "train.batch_size=32",  # not TINY's 16: half the steps on those larger training sets
    "train.epochs=3",  # as the default sweep (its 8192 images); 3 exercise every path
    "eval.corruptions=[fog]",
    "eval.severities=[1]",
]


def tiny_sweep(tmp_path: Path, *overrides: str) -> list[str]:
    """``clipray sweep`` (the default sweep file) shrunk by TINY_SWEEP, then ``overrides``."""
    sets = [f"eval.cache_dir={tmp_path / 'cache'}", *TINY_SWEEP, *overrides]
    return [str(BIN / "clipray"), "sweep", *[a for o in sets for a in ("--set", o)]]


def child_runs(client: MlflowClient) -> list:
    """The trial runs of the ``clipray`` experiment (deleted ones are not listed)."""
    exp = client.get_experiment_by_name("clipray")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if TRIAL_TAG in r.data.tags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over a SQLite store and an artifact folder in ``root``;
    it can be stopped and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow-server.db'}",
             "--artifacts-destination", str(self.root / "mlflow-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    pytest.fail("mlflow server did not come up")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class Sweep:
    """A ``clipray sweep`` subprocess whose output lines are collected as they come."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env if env is not None else dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 420) -> None:
        """Poll ``ready()`` until it holds; fail with the output if the sweep ends first."""
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline or self.proc.poll() is not None:
                self.kill()
                pytest.fail(f"never reached {what}:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.05)

    def kill_when(self, ready: Callable[[], bool], what: str, timeout: float = 420) -> None:
        """SIGKILL the driver (then what Ray left of it) as soon as ``ready()``."""
        self.wait_for(ready, what, timeout)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(3)  # let Ray notice its driver is gone, then clear what is left
        self.kill()

    def kill(self) -> None:
        """SIGKILL the sweep's whole process group (its Ray processes too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 900) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return "".join(self.lines)
