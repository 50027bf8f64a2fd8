"""Runs first in every Ray worker process of a sweep (runtime_env ``worker_process_setup_hook``).

Each Train worker logs every report in full, and where Ray runs without its dashboard (no state
API), Ray Train's placement-group cleaner warns about it every few seconds of every trial. A
sweep's console is for the trial table and results; Ray's own log files
(``/tmp/ray/session_latest/logs``) keep the rest.
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


def quiet_logs() -> None:
    for name, level in NOISY.items():
        logging.getLogger(name).setLevel(level)
