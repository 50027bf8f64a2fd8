"""Orchestration overhead of a sweep, and training throughput inside Ray Train, in one run.

1. A bare ``TorchTrainer.fit()`` of a trivial loop (3 reports) inside a Tune trial, with Ray's
   defaults and with the settings clipray uses (``clipray.sweep.runtime.RAY_ENV``), each in a
   fresh Ray.
2. ``clipray sweep`` itself (2 trials: the baseline and one PGD trial, tiny data), from the MLflow
   metrics every trial records: wall time from ``clipray sweep`` to the first training step, and
   per trial, the time not spent in training steps, validation or scoring.
3. Clean training throughput (samples/s) inside Ray Train (the baseline trial's second epoch)
   against the plain open_clip loop over the same model and batch in this process (same
   thread count); between them, the same training run (second epoch) in a process of its own
   without Ray, and as a bare Ray Train run without Tune or the scorer pool, to show where the
   difference comes from.
4. Where the machine's cores go while a sweep trial trains: every process's CPU time from
   ``/proc``, sampled every 2 s during the sweep of step 2, over the intervals in which a Ray Train
   worker was training, grouped by role.

    python benchmarks/bench_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def bare_trial() -> None:
    """Child mode: one Tune trial running a trivial 3-report TorchTrainer; prints JSON timings."""
    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import ray.train

        for i in range(3):
            ray.train.report({"i": i})

    def trial(config: dict) -> None:
        t0 = time.time()
        TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="bare", storage_path=config["storage"]),
        ).fit()
        tune.report({"fit_s": time.time() - t0})

    storage = tempfile.mkdtemp()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    grid = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.1}),
        param_space={"storage": storage},
        run_config=tune.RunConfig(storage_path=storage, name="t", verbose=0),
    ).fit()
    print(json.dumps({"fit_s": grid[0].metrics["fit_s"], "tuner_s": time.time() - t0}))


TRAIN_SETS = ["data.train_size=2048", "data.val_size=64"]  # the sweep's trials and the children


def train_child(where: str) -> None:
    """Child mode: the sweep's training run without Tune; prints samples/s per epoch."""
    import torch

    from clipray.config.loading import load_experiment
    from clipray.core.device import torch_threads

    exp = load_experiment(REPO / "sweeps" / "default.yaml", [*TRAIN_SETS, "train.epochs=2"])
    if where == "process":
        from clipray.core.trainer import NoHooks, build_trainer

        torch.set_num_threads(torch_threads(exp.train.cpus_per_worker))
        trainer = build_trainer(exp, torch.device("cpu"))
        trainer.fit(NoHooks())
        history = trainer.history
    else:
        from clipray.sweep.ray_train import make_trainer, read_checkpoint
        from clipray.sweep.runtime import init_ray

        init_ray()
        with tempfile.TemporaryDirectory() as tmp:
            result = make_trainer(exp, name="bare", storage_path=tmp, report_to_tune=False).fit()
            history = read_checkpoint(result.checkpoint)["history"]
    print(json.dumps([h["train/samples_per_s"] for h in history]))


def run_child(flag: str, *args: str, env: dict[str, str] | None = None) -> Any:
    out = subprocess.run(
        [sys.executable, __file__, flag, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bare(env_overrides: dict[str, str]) -> dict[str, float]:
    return run_child("--bare-child", env={**os.environ, **env_overrides})


# Who gets the CPU while a trial trains, by process role (matched against /proc/PID/cmdline).
ROLES = [
    ("Ray Train worker (the training)", r"RayTrainWorker"),
    (
        "Ray Train's per-run actors: controller, placement-group cleaner, sync, dataset manager,"
        " autoscaling coordinator",
        r"TrainController|PlacementGroupCleaner|SynchronizationActor|DatasetManager"
        r"|_AutoscalingCoordinator",
    ),
    (
        "Tune: the sweep driver, the trial process, Tune's report-queue actor",
        r"clipray sweep"
        r"|ImplicitFunc|_QueueActor",
    ),
    ("clipray's scorer pool (idle while training)", r"ray::_Coordinator|ray::ScorerWorker"),
    (
        "Ray's system processes: GCS, raylet, dashboard and its modules, agents, log monitor",
        r"gcs_server|raylet|dashboard|DashboardAgent|log_monitor|monitor\.py|runtime_env",
    ),
]
OTHER = "anything else on the host"


class CpuShares:
    """Samples every process's CPU time from /proc every ``interval`` s on a thread; keeps the
    intervals in which a Ray Train worker used more than one core, and sums them by role."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.totals = dict.fromkeys([role for role, _ in ROLES] + [OTHER], 0.0)  # core-seconds
        self.seconds = 0.0  # of intervals with training in them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuShares:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _snapshot() -> dict[int, tuple[int, str]]:
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
            except OSError:  # the process ended
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(pid)] = (int(fields[11]) + int(fields[12]), cmd)  # utime + stime
        return out

    def _run(self) -> None:
        before, t0 = self._snapshot(), time.time()
        while not self._stop.wait(self.interval):
            after, t1 = self._snapshot(), time.time()
            used: dict[str, float] = dict.fromkeys(self.totals, 0.0)
            for pid, (ticks, cmd) in after.items():
                cores = (ticks - before.get(pid, (ticks, ""))[0]) / self._hz / (t1 - t0)
                role = next((r for r, pattern in ROLES if re.search(pattern, cmd)), OTHER)
                used[role] += cores
            if used[ROLES[0][0]] > 1.0:  # a Train worker is training in this interval
                for role, cores in used.items():
                    self.totals[role] += cores * (t1 - t0)
                self.seconds += t1 - t0
            before, t0 = after, t1

    def shares(self) -> dict[str, float]:
        """Mean cores per role over the training intervals."""
        return {r: c / self.seconds for r, c in self.totals.items()} if self.seconds else {}


def run_clipray_sweep(workdir: Path, epochs: int) -> tuple[float, list[dict], dict[str, float]]:
    """Run the real CLI; return its start time, each trial's final MLflow metrics, and the mean
    cores each process role used while a trial trained."""
    from mlflow.tracking import MlflowClient

    overrides = [
        "name=bench",
        f"storage={workdir}",
        "sweep.num_samples=2",
        f"train.epochs={epochs}",
        *TRAIN_SETS,
        "data.test_size=64",
        "eval.corruptions=[fog,gaussian_noise]",
        "eval.severities=[3]",
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    t0 = time.time()
    with CpuShares() as cpu:
        subprocess.run(
            [str(BIN / "clipray"), "sweep", str(REPO / "sweeps" / "default.yaml"), *sets],
            cwd=workdir,
            check=True,
            capture_output=True,
            text=True,
        )
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clipray")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "clipray.trial_id" in r.data.tags]
    trials = []
    for r in sorted(runs, key=lambda r: r.info.start_time):
        m = dict(r.data.metrics)
        m["name"] = r.info.run_name
        history = client.get_metric_history(r.info.run_id, "train/samples_per_s")
        m["samples_per_s_by_epoch"] = [h.value for h in sorted(history, key=lambda h: h.step)]
        m["first_step_at"] = min(
            h.value for h in client.get_metric_history(r.info.run_id, "time/first_step_at")
        )
        trials.append(m)
    return t0, trials, cpu.shares()


def plain_throughput(batch: int, threads: int, rounds: int) -> float:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_perturb import plain_samples_per_s  # the same plain loop as the core benchmark

    torch.set_num_threads(threads)
    return plain_samples_per_s(batch, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch per trial")
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-child", choices=["process", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        bare_trial()
        return
    if args.train_child:
        train_child(args.train_child)
        return
    from clipray.sweep.runtime import RAY_ENV

    defaults = run_bare({})
    tuned = run_bare(dict(RAY_ENV))
    with tempfile.TemporaryDirectory() as tmp:
        t0, trials, shares = run_clipray_sweep(Path(tmp), epochs=2)
    plain = plain_throughput(batch=64, threads=2, rounds=6 if args.quick else 20)
    alone = run_child("--train-child", "process")[-1]
    bare_ray = run_child("--train-child", "ray")[-1]

    print("### Orchestration overhead\n")
    print("| what | wall s |\n|---|---|")
    print(
        f"| bare TorchTrainer.fit() of a 3-report loop in a Tune trial, Ray defaults | "
        f"{defaults['fit_s']:.1f} |"
    )
    print(f"| the same with clipray's Ray settings | {tuned['fit_s']:.1f} |")
    print(
        f"| `clipray sweep` start to the first training step | "
        f"{trials[0]['first_step_at'] - t0:.1f} |"
    )
    print(
        "\n| trial | total s | to first step | train steps | validation | scoring | logging "
        "| overhead (total - steps - validation - scoring) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in trials:
        print(
            f"| {t['name']} | {t['trial_time/total_s']:.1f} | "
            f"{t.get('trial_time/to_first_step_s', float('nan')):.1f} | "
            f"{t['trial_time/train_steps_s']:.1f} | {t['trial_time/validate_s']:.1f} | "
            f"{t['trial_time/score_s']:.1f} | {t['trial_time/log_s']:.1f} | "
            f"{t['trial_time/overhead_s']:.1f} |"
        )
    ray_rate = trials[0]["samples_per_s_by_epoch"][-1]
    print("\n### Training throughput inside Ray Train\n")
    print("| loop | samples/s | ratio to plain |\n|---|---|---|")
    print(f"| plain open_clip loop, this process, 2 threads | {plain:.0f} | 1.00 |")
    print(
        f"| the same training run (epoch 2) in a process of its own, no Ray | {alone:.0f} | "
        f"{alone / plain:.3f} |"
    )
    print(
        f"| the same run as a bare Ray Train run (no Tune, no scorer pool) | {bare_ray:.0f} | "
        f"{bare_ray / plain:.3f} |"
    )
    print(
        f"| clipray trial inside Ray Train (baseline, epoch 2, 2 threads) | {ray_rate:.0f} | "
        f"{ray_rate / plain:.3f} |"
    )
    if shares:
        print(f"\n### Where the {os.cpu_count()} cores go while a sweep trial trains\n")
        print("| process role | cores |\n|---|---|")
        for role, cores in shares.items():
            print(f"| {role} | {cores:.2f} |")
        print(f"| all | {sum(shares.values()):.2f} |")


if __name__ == "__main__":
    main()
