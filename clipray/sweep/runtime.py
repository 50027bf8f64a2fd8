"""The Ray runtime a sweep runs on: joining or starting it, and checking it can run the sweep."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from clipray.config.errors import ConfigError, brief
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.core.device import wants_gpu
from clipray.sweep.ingest import decode_tasks
from clipray.sweep.ray_train import TRAIN_ENV

RAY_ENV = {  # the Train settings (clipray.sweep.ray_train.TRAIN_ENV) and the sweep driver's
    **TRAIN_ENV,
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # epoch reports carry no corrupted metrics yet
    "RAY_AIR_NEW_OUTPUT": "0",  # the classic trial table, with the columns we choose
}


# Ray Tune copies these into every trial's runtime environment, and Ray's runtime-env agent logs
# each runtime environment it creates, in plain text, at INFO (ray/tune/execution/class_cache.py).
KEY_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def guard_secrets(starting_ray_here: bool) -> None:
    """Warn once about key variables; keep them out of the logs of a Ray that clipray starts.

    A Ray started here runs at warning log level when key variables are set, so the runtime-env
    agent never writes them; a cluster's own Ray logs them at its own level: there, use instance
    roles instead of key variables (README, "Secrets").
    """
    present = [k for k in KEY_VARIABLES if os.environ.get(k)]
    if not present:
        return
    where = "this sweep's Ray logs at warning level" if starting_ray_here else "see README Secrets"
    print(
        f"warning: {', '.join(present)} set: Ray Tune hands AWS key variables to every trial, "
        f"and Ray's runtime-env agent logs them at INFO; prefer instance roles ({where})",
        flush=True,
    )
    if starting_ray_here:
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")


PROBE_TIMEOUT_S = 3.0  # a GCS on a reachable node answers a TCP connect in milliseconds


def _target(address: str) -> tuple[str, int] | None:
    """The ``(host, port)`` ``ray.init`` will connect to for ``address``, resolved the way Ray
    resolves it (``auto``: the cluster this machine last started; ``127.0.0.1``: this node's IP);
    None for ``local``. ``ray://host:port`` (Ray Client) is connected to as written."""
    if address.startswith("ray://"):
        host, sep, port = address.removeprefix("ray://").rpartition(":")
        canonical: str | None = f"{host}:{port}" if sep and host else "bad"
    elif address == "local":
        return None
    else:
        try:  # Ray's own resolution (private API; the documented behaviour of RAY_ADDRESS)
            from ray._private.services import canonicalize_bootstrap_address

            canonical = canonicalize_bootstrap_address(address)
        except ImportError:  # another Ray: check the address as written
            canonical = None if address == "auto" else address
        except ConnectionError:  # auto: "Could not find any running Ray instance"
            canonical = None
        except Exception:  # Ray: "Invalid address format"
            canonical = "bad"
        if canonical is None:
            raise ConfigError(
                f"RAY_ADDRESS: {brief(address)}: no Ray cluster runs on this machine; start one "
                "(ray start --head) or unset RAY_ADDRESS to run here"
            )
    host, _, port = canonical.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"RAY_ADDRESS: {brief(address)}: expected host:port, ray://host:port or auto"
        )
    return host.strip("[]"), int(port)


def check_ray_address() -> None:
    """When ``RAY_ADDRESS`` is set, the cluster it names must accept a TCP connection to its
    GCS (or Ray Client server) within ``PROBE_TIMEOUT_S``; otherwise ``ray.init`` would retry
    for minutes, after the sweep had written its manifest and MLflow runs. One line naming the
    address instead. Nothing to check without RAY_ADDRESS, for ``local``, or when Ray already
    runs in this process."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or ray.is_initialized():
        return
    target = _target(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or brief(str(e))
        raise ConfigError(
            f"RAY_ADDRESS: no Ray cluster at {brief(address)} ({reason}); start one (ray start "
            "--head) or unset RAY_ADDRESS to run on this machine"
        ) from None


def init_ray() -> bool:
    """Join the cluster when there is one (RAY_ADDRESS / ray up), else start Ray here.

    Returns whether Ray runs on this machine only (and no autoscaler may add nodes).
    """
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    if not ray.is_initialized():
        guard_secrets(starting_ray_here=not os.environ.get("RAY_ADDRESS"))
        runtime_env = {
            "env_vars": {k: os.environ[k] for k in RAY_ENV},
            "worker_process_setup_hook": "clipray.sweep.ray_worker.setup",
        }
        address = os.environ.get("RAY_ADDRESS")
        check_ray_address()
        try:
            ray.init(runtime_env=runtime_env)  # the dashboard also serves Ray's state API
        except ConnectionError as e:
            raise ConfigError(f"RAY_ADDRESS: no Ray cluster at {address!r} ({e})") from None
    alive = [n for n in ray.nodes() if n["Alive"]]
    return not os.environ.get("RAY_ADDRESS") and len(alive) == 1


def check_resources(exp: Experiment, have: dict[str, float], local: bool) -> None:
    """The pool plus one trial must fit in ``have`` (the cluster's resources), or the first
    trial would wait forever; on a cluster that may grow, only a warning. With Ray Data decode
    tasks, every concurrent trial must fit: Tune does not know about the tasks a trial's
    workers start, and a trial whose tasks find no free CPU would wait forever."""
    sc, tr = exp.eval.scorers, exp.train
    decode = decode_tasks(exp)
    trials = exp.sweep.max_concurrent_trials if decode else 1
    trial_gpus = tr.num_workers if wants_gpu(tr.use_gpu, have.get("GPU", 0) > 0) else 0
    one = f"{exp.sweep.cpus_per_trial:g} + {tr.num_workers} x {tr.cpus_per_worker:g} CPU" + (
        f" + {tr.num_workers} x {decode} for Ray Data decode tasks" if decode else ""
    )
    needs = {
        "CPU": (
            sc.num_actors * sc.cpus_per_actor
            + trials * (exp.sweep.cpus_per_trial + tr.num_workers * (tr.cpus_per_worker + decode)),
            f"eval.scorers / train.cpus_per_worker / sweep.cpus_per_trial"
            f"{' / data.loader_workers / sweep.max_concurrent_trials' if decode else ''}: "
            f"the scorer pool ({sc.num_actors} x {sc.cpus_per_actor} CPU) and "
            f"{trials} trial{'s' if trials > 1 else ''} ({one})",
        ),
        "GPU": (
            sc.num_actors * sc.gpus_per_actor + trial_gpus,
            f"eval.scorers.gpus_per_actor / train.use_gpu: the scorer pool ({sc.num_actors} x "
            f"{sc.gpus_per_actor} GPU) and one trial ({trial_gpus} GPU)",
        ),
    }
    for what, (need, message) in needs.items():
        if need > have.get(what, 0.0) + 1e-9:
            message = f"{message} need {need:g} {what}s; this Ray cluster has {have.get(what, 0):g}"
            if what == "CPU" and decode:
                message += " (data.ingest=processes decodes inside each rank's own CPUs)"
            if local:
                raise ConfigError(message)
            print(f"warning: {message} (waiting for the autoscaler)", flush=True)


PROBE_PREFIX = ".clipray-storage-probe-"  # a file the reach check writes and removes again
REACH_TIMEOUT_S = 120.0  # a worker process per node: seconds, unless a node cannot start one


def _read_probe(path: str) -> str | None:
    """Runs on each node: the probe file's token, or None where this node does not see it."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_storage_reach(exp: Experiment) -> None:
    """A local ``storage`` path on a cluster of several nodes must be one directory that every
    node mounts (NFS and the like): trials on other nodes write their results and checkpoints
    there, and a node-local path would leave them on that node's own disk, out of the sweep's
    reach. Checked by writing a probe file (removed again) where the storage directory is, or
    would be created, and reading it on every node. Nothing to check for remote storage
    (``s3://``, ``gs://``) or on one node."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if storage.is_remote(exp.storage) or len(nodes) < 2:
        return
    path = Path(storage.absolute(exp.storage))
    anchor = next(p for p in (path, *path.parents) if p.is_dir())  # where the sweep will write
    probe, token = anchor / f"{PROBE_PREFIX}{secrets.token_hex(8)}", secrets.token_hex(16)
    try:
        probe.write_text(token)
    except OSError as e:
        raise ConfigError(
            f"storage: {brief(str(path))}: cannot write in {anchor} ({e.strerror})"
        ) from None
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        on = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
        seen = ray.get(
            [read.options(scheduling_strategy=s).remote(str(probe)) for s in on],
            timeout=REACH_TIMEOUT_S,
        )
    except ray.exceptions.GetTimeoutError:
        print(f"warning: storage: not every node answered within {REACH_TIMEOUT_S:.0f}s; "
              f"{path} must be a directory every node mounts", flush=True)  # fmt: skip
        return
    finally:
        probe.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, got in zip(nodes, seen, strict=True) if got != token]
    if blind:
        raise ConfigError(
            f"storage: {brief(str(path))} is a node-local path: {len(blind)} of the "
            f"{len(nodes)} nodes of this Ray cluster do not see it ({', '.join(sorted(blind))}); "
            "use a directory every node mounts (NFS) or s3:// / gs:// storage"
        )
