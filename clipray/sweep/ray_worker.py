"""Runs first in every Ray worker process of a sweep (runtime_env ``worker_process_setup_hook``).

Two things Ray's own code in those processes needs from us:

- **Quiet logs.** Each Train worker logs every report in full, and where Ray runs without its
  dashboard (no state API), Ray Train's placement-group cleaner warns about it every few
  seconds of every trial. A sweep's console is for the trial table and results; Ray's own log
  files (``/tmp/ray/session_latest/logs``) keep the rest.
- **The worker's own cluster.** Ray's state API (which Ray Train's placement-group cleaner
  polls to see whether its trial's controller still lives) finds its cluster by auto-detection
  unless ``RAY_ADDRESS`` is set; with two Ray instances on one machine (two sweeps, or a test
  run beside a sweep) it raises "Found multiple active Ray instances" and the cleaner's thread
  dies, so a crashed trial's placement group would never be removed. Each worker therefore
  names the cluster it belongs to in ``RAY_ADDRESS``; on a cluster it is already set, to the
  same address.
"""

import logging
import os

import ray

_TRAIN = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution")
NOISY = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # Every report, in full; this module names its logger after its file, not its module.
    os.path.join(_TRAIN, "context.py"): logging.WARNING,
}
# Ray Train configures its workers' loggers after this hook, so the training loop calls it again.


def setup() -> None:
    """The hook: quiet logs, and ``RAY_ADDRESS`` pinned to this worker's cluster."""
    quiet_logs()
    pin_cluster()


def quiet_logs() -> None:
    for name, level in NOISY.items():
        logging.getLogger(name).setLevel(level)


def pin_cluster() -> None:
    """``RAY_ADDRESS`` = the GCS this process is connected to, unless already set."""
    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
