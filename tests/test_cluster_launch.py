"""``ray up`` -> ``ray job submit`` (a sweep) -> ``ray down``, for real, on three hosts.

The hosts are network namespaces on a bridge, each with its own sshd, PID, mount and UTS
namespace (tests/nshosts.py says what each has). The launcher is this machine with a home and
temp directories of its own; it runs ``ray up -y`` with a copy of ``cluster-local.yaml`` whose
addresses and key are the test's, then does what README "Running on a cluster" tells users:
submit a sweep through the dashboard tunnel, watch it, open MLflow through an SSH tunnel, lose
the head and resume, ``ray down``. Nothing here is mocked: sshd, rsync, pip, Ray, MLflow and
clipray all run as they would on machines.

Root only (network namespaces, mounts): CI runs as root; elsewhere these tests skip. The test
installs Debian's openssh-server and rsync when missing (apt-get). Slow: about ten minutes on
two cores. One run at a time per machine: every run uses 198.51.100.0/24.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.e2e import child_runs, free_port
from tests.nshosts import SHARED, Hosts, install_image_packages, ssh_keypair

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NAMES = ["head", "worker1", "worker2"]
# The default sweep, tiny. Each trial's two Train workers take 1.5 CPUs each (the default), so
# no 2-CPU host holds both: every trial trains across two hosts.
SWEEP = [
    "data.train_size=128", "data.val_size=16", "data.test_size=16", "train.batch_size=32",
    "train.warmup_steps=2", "train.epochs=1", "eval.corruptions=[fog]", "eval.severities=[1]",
    "train.num_workers=2", "eval.scorers.num_actors=1",
]  # fmt: skip

STOP_MLFLOW = 'kill -- -"$(cat ~/mlflow.pid)"'  # README: ray down stops only Ray

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="builds hosts from network namespaces and mounts: needs root (CI runs as root)",
    ),
]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three namespace hosts; removed (every process, namespace and link) however the
    module ends."""
    install_image_packages()
    base = tmp_path_factory.mktemp("cluster")
    built = Hosts(base, NAMES, ssh_keypair(base), prefix=f"clr{os.getpid() % 10000}")
    try:
        yield built.start()
    finally:
        built.close()


class Launcher:
    """The user's machine: ``ray`` commands with a home and temp directories of their own,
    run from the repository (``file_mounts: {~/clipray: .}``) on the test's cluster file."""

    def __init__(self, hosts: Hosts):
        self.hosts, root = hosts, hosts.base / "launcher"
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        for var, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("RAY_TMPDIR", "tmp")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(root / sub)
        for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(var, None)
        self.config = root / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(cluster_file(hosts), sort_keys=False))
        self.name = yaml.safe_load(self.config.read_text())["cluster_name"]
        self.dashboard = self.mlflow = ""  # http://127.0.0.1:PORT once tunnelled
        self.tunnels: list[subprocess.Popen] = []

    def ray(self, *args: str, timeout: float = 300, check: bool = True):
        done = subprocess.run(
            [str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            pytest.fail(f"ray {' '.join(args[:2])}: exit {done.returncode}: {_tail(done)}")
        return done

    def tunnel(self, argv: list[str], port: int) -> str:
        """A tunnel process kept open (and closed by :meth:`close`); waits for its port."""
        proc = subprocess.Popen(
            argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.tunnels.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _http(url) is not None, 60, f"a tunnel to {url}")
        return url

    def open_tunnels(self) -> None:
        """The dashboard's (``ray dashboard``) and MLflow's (ssh -L to the head's private
        address), as README says; again after the head was lost (its SSH sessions with it)."""
        self.close_tunnels()
        port = free_port()
        self.dashboard = self.tunnel(["ray", "dashboard", "-p", str(port), str(self.config)], port)
        port, head = free_port(), self.hosts["head"]
        forward = self.hosts.ssh_argv(head, "-N", "-L", f"{port}:{head.ip}:5000")
        self.mlflow = self.tunnel(forward, port)

    def close_tunnels(self) -> None:
        for proc in self.tunnels:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        self.tunnels = []

    def close(self) -> None:
        self.close_tunnels()
        shutil.rmtree(self.control_path(), ignore_errors=True)
        with contextlib.suppress(OSError):  # its parent, when no other cluster uses it
            self.control_path().parent.rmdir()

    def control_path(self) -> Path:
        """The launcher's SSH connection sharing: /tmp/ray_ssh_<user>/<cluster> whatever TMPDIR
        says (ray/autoscaler/_private/command_runner.py); the cluster name is this run's own."""
        user, name = (
            hashlib.sha256(s.encode()).hexdigest()[:10] for s in (getpass.getuser(), self.name)
        )
        return Path(f"/tmp/ray_ssh_{user}/{name}")


def cluster_file(hosts: Hosts) -> dict:
    """cluster-local.yaml with the test's hosts, user and key: nothing else changes."""
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    config["cluster_name"] = f"{hosts.prefix}-test"
    config["provider"]["head_ip"] = hosts["head"].ip
    config["provider"]["worker_ips"] = [hosts[n].ip for n in NAMES[1:]]
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    return config


@pytest.fixture(scope="module")
def launcher(hosts):
    """``ray up -y`` (and, however the module ends, ``ray down -y``), then a dashboard tunnel
    (``ray dashboard``) and an MLflow tunnel (ssh -L to the head's private address)."""
    user = Launcher(hosts)
    try:
        user.ray("up", "-y", str(user.config), timeout=900)
        _wait(lambda: _active_nodes(user) == len(NAMES), 300, "every node in ray status")
        user.open_tunnels()
        yield user
    finally:
        user.ray("down", "-y", str(user.config), timeout=300, check=False)
        user.close()


# ---------------------------------------------------------------------------------- helpers
def _tail(done: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (done.stdout + done.stderr)[-n:]


def _wait(ready, timeout: float, what: str, every: float = 2.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode(errors="replace")
    except OSError:
        return None


def _active_nodes(user: Launcher) -> int:
    """Active nodes in ``ray status``, run on the head through the launcher (``ray exec``)."""
    done = user.ray("exec", str(user.config), "ray status", check=False, timeout=120)
    found = re.search(r"Active:\s*\n\s*(\d+) local\.cluster\.node", done.stdout)
    return int(found.group(1)) if found else 0


def submit(user: Launcher, command: str, timeout: float = 900) -> tuple[str, str]:
    """``ray job submit`` through the dashboard tunnel, as the README says; waits for the job
    to end and returns its status and logs."""
    done = user.ray("job", "submit", "--address", user.dashboard, "--no-wait", "--", "bash",
                    "-c", f"cd ~/clipray && {command}")  # fmt: skip
    job = re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)

    def status() -> str:  # the job REST API of the dashboard, through the tunnel
        info = _http(f"{user.dashboard}/api/jobs/{job}")
        return json.loads(info)["status"] if info else "UNKNOWN"

    _wait(lambda: status() in ("SUCCEEDED", "FAILED", "STOPPED"), timeout, f"job {job}", 5)
    logs = user.ray("job", "logs", "--address", user.dashboard, job).stdout
    return status(), logs


def sweep_command(name: str, *extra: str, storage: str = f"{SHARED}/runs") -> str:
    sets = [f"storage={storage}", f"name={name}", *SWEEP, *extra]
    return "./scripts/cluster-sweep sweeps/default.yaml " + " ".join(f"--set {s}" for s in sets)


def _train_nodes(user: Launcher) -> list[set[str]]:
    """Per Ray Train run (one per trial): the IPs of the hosts its workers ran on."""
    listed = {}
    for kind in ("nodes", "actors"):
        args = ["list", kind, "--address", user.dashboard, "--format", "json", "--limit", "10000"]
        if kind == "actors":
            args += ["--filter", "class_name=RayTrainWorker", "--detail"]
        listed[kind] = json.loads(user.ray(*args).stdout)
    ip = {n["node_id"]: n["node_ip"] for n in listed["nodes"]}
    runs: dict[str, set[str]] = {}
    for actor in listed["actors"]:
        runs.setdefault(actor["placement_group_id"], set()).add(ip[actor["node_id"]])
    return list(runs.values())


def _mlflow_runs(user: Launcher, name: str) -> tuple[list, list]:
    """The sweep ``name``'s parent run and its trials' runs, from MLflow through the tunnel."""
    client = MlflowClient(user.mlflow)
    exp = client.get_experiment_by_name("clipray")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.info.run_name and r.info.run_name.startswith(name)]
    parent_ids = {r.info.run_id for r in parents}
    children = [
        r for r in child_runs(client) if r.data.tags.get("mlflow.parentRunId") in parent_ids
    ]
    return parents, children


# ------------------------------------------------------------------------------------ the tests
def test_ray_up_starts_ray_on_every_host_from_the_cluster_file(hosts, launcher):
    """Every host runs its own raylet, installed clipray from its own copy of the repository
    (setup commands), and ``ray status`` through ``ray exec`` needs no token."""
    for host in hosts.hosts:
        assert any("raylet" in p for p in host.processes()), host.name
        where = hosts.ssh(
            host, "cd /tmp && bash -lc 'python3 -c \"import clipray; print(clipray.__file__)\"'"
        )
        assert where.stdout.strip().endswith("/root/clipray/clipray/__init__.py"), where.stdout
    head = hosts["head"].processes()
    assert any("gcs_server" in p for p in head) and any("mlflow server" in p for p in head), head
    assert not any("gcs_server" in p for n in NAMES[1:] for p in hosts[n].processes())


def test_a_sweep_submitted_as_a_job_trains_across_hosts(hosts, launcher):
    """The README's way: ``ray job submit`` through the dashboard tunnel runs
    scripts/cluster-sweep on the head; each trial's two Train workers run on two hosts; MLflow on
    the head has the parent run and one finished child run per trial; the results are in the
    shared storage."""
    status, logs = submit(launcher, sweep_command("launch", "sweep.num_samples=2"))
    assert status == "SUCCEEDED" and "finished: 2 trials" in logs, logs[-4000:]
    runs = _train_nodes(launcher)
    assert len(runs) == 2 and all(len(ips) == 2 for ips in runs), runs
    parents, children = _mlflow_runs(launcher, "launch")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all("agg/mean_corrupted_rsum" in r.data.metrics for r in children)
    sweep = hosts.shared / "runs" / "launch"
    for name in ("clipray_sweep.json", "results.csv", "best_config.yaml"):
        assert (sweep / name).is_file(), name
    assert len(list(sweep.glob("train/*/checkpoint_*/checkpoint.pt"))) >= 2


def test_the_head_exposes_mlflow_to_the_cluster_and_nothing_else(hosts, launcher):
    """From a worker host: MLflow on the head's private address answers, the dashboard (job
    submission: running code) does not; on the head's loopback the dashboard is up. The MLflow
    UI and the dashboard both open on the launcher through their tunnels."""
    head = hosts["head"].ip
    code = "curl -s -o /dev/null -w '%{http_code}' --max-time 5 "
    from_worker = hosts.ssh(hosts["worker1"], f"{code}http://{head}:5000/health", check=False)
    assert from_worker.stdout == "200", from_worker
    refused = hosts.ssh(hosts["worker1"], f"{code}http://{head}:8265/", check=False)
    assert refused.returncode == 7 and refused.stdout == "000", refused  # connection refused
    on_head = hosts.ssh(hosts["head"], f"{code}http://127.0.0.1:8265/", check=False)
    assert on_head.stdout == "200", on_head
    assert "mlflow" in (_http(launcher.mlflow + "/") or "").lower()
    assert "ray" in (_http(launcher.dashboard + "/") or "").lower()


def test_a_node_local_storage_path_is_refused_before_the_sweep_starts(hosts, launcher):
    """``storage`` under the head's home: the workers do not see it; one line, nothing made."""
    status, logs = submit(launcher, sweep_command("local", storage="/root/runs"), timeout=300)
    errors = [line for line in logs.splitlines() if line.startswith("clipray: error:")]
    assert status == "FAILED" and len(errors) == 1, logs[-3000:]
    assert "storage: '/root/runs' is a node-local path: 2 of the 3 nodes" in errors[0], errors
    assert "Traceback" not in logs
    left = hosts["head"].run("ls -a /root/runs /root | grep -c clipray-storage-probe")
    assert "No such file" in left.stderr and left.stdout.strip() == "0", left


def test_a_sweep_resumes_after_the_head_is_lost(hosts, launcher):
    """Storage and the MLflow store are on the shared directory: after every process of the
    head is killed mid-sweep (Ray, MLflow, the sweep's driver), ``ray up`` brings the head back
    and the same command with ``--resume`` finishes the sweep: all its trials, one parent run,
    no duplicate child runs."""
    user, sweep = launcher, hosts.shared / "runs" / "lost"
    user.ray("job", "submit", "--address", user.dashboard, "--no-wait", "--", "bash", "-c",
             f"cd ~/clipray && {sweep_command('lost', 'sweep.num_samples=3')}")  # fmt: skip
    _wait(lambda: len(_finished(sweep)) >= 1, 900, "the first trial of the sweep to finish")
    hosts["head"].run("kill -9 -1")  # all but PID 1 (sshd): as if the machine had rebooted
    user.ray("up", "-y", str(user.config), timeout=900)
    _wait(lambda: _active_nodes(user) == len(NAMES), 400, "every node back in ray status")
    user.open_tunnels()  # they ended with the head's SSH sessions
    status, logs = submit(user, sweep_command("lost", "sweep.num_samples=3") + " --resume")
    assert status == "SUCCEEDED" and "finished: 3 trials" in logs, logs[-4000:]
    parents, children = _mlflow_runs(user, "lost")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)


def _finished(sweep: Path) -> list[Path]:
    """Trials of a sweep whose scores are in (Tune writes ``result.json`` per trial)."""
    done = []
    for result in sweep.glob("*/result.json"):
        if "agg/mean_corrupted_rsum" in result.read_text():
            done.append(result)
    return done


def test_ray_down_leaves_nothing_of_the_cluster(hosts, launcher):
    """The README's teardown: the MLflow server, ``ray down -y`` (Ray on the head), ``ray stop``
    on each worker over SSH (the local provider never stops workers); then removing the hosts
    leaves no process, namespace, bridge or sshd of this test."""
    launcher.ray("exec", str(launcher.config), STOP_MLFLOW)
    launcher.ray("down", "-y", str(launcher.config), timeout=300)
    assert not [p for p in hosts["head"].processes() if "ray" in p or "mlflow" in p]
    for name in NAMES[1:]:
        hosts.ssh(hosts[name], "bash -lc 'ray stop --force'", check=False)
        assert not [p for p in hosts[name].processes() if "ray" in p], name
    launcher.close()
    hosts.close()
    assert hosts.leftovers() == []
    assert not launcher.control_path().exists()
