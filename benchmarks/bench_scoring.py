"""Benchmark the scoring pool: 1 vs 2 actors, and a second checkpoint against the first.

Prints markdown tables, all measured in one run on a fresh cache directory:

1. Scoring wall time of one checkpoint with 1 and 2 actors over a warm cache (best of
   ``--repeats``), as a ratio to 1 actor, with the results checked identical.
2. The first checkpoint on a cold cache (pool start + building every cell + scoring), a second
   checkpoint on the same pool, and the first again on a new pool over the now warm cache, with
   the corruption builds and cache hits each of them cost.

    python benchmarks/bench_scoring.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Any

import ray
import torch

from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment
from clipray.core.trainer import NoHooks, build_trainer
from clipray.scoring.plan import eval_cells
from clipray.scoring.pool import ScorerPool


def experiment(quick: bool, cache: str, actors: int) -> Experiment:
    """The default sweep's eval (15 common corruptions x 3 severities, 256 test images) or, with
    --quick, 64 images and 5 corruptions (the two dearest included) x 2 severities."""
    common = [
        "data.train_size=256",
        "train.batch_size=32",
        "train.epochs=1",
        f"eval.cache_dir={cache}",
        f"eval.scorers.num_actors={actors}",
        "eval.scorers.cpus_per_actor=1",
    ]
    if quick:
        size = ["data.test_size=64", "eval.severities=[1, 3]"]
        size.append("eval.corruptions=[gaussian_noise, glass_blur, zoom_blur, fog, contrast]")
    else:
        size = ["data.test_size=256", "eval.severities=[1, 3, 5]", "eval.corruptions=[common]"]
    return load_experiment(None, common + size)


def checkpoints(exp: Experiment) -> list[dict]:
    """Two distinct checkpoints of the tiny model: as initialised and after one short epoch."""
    trainer = build_trainer(exp, torch.device("cpu"))
    first = trainer.state_dict()
    trainer.fit(NoHooks())
    return [first, trainer.state_dict()]


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def actors_table(quick: bool, cache: str, blob: dict, repeats: int) -> None:
    """Warm cache: best-of-``repeats`` score() wall time with 1 and 2 actors."""
    print(f"| actors | ready s | score s (best of {repeats}) | vs 1 actor | identical |")
    print("|---|---|---|---|---|")
    base, reference = None, None
    for actors in (1, 2):
        pool = ScorerPool.create(experiment(quick, cache, actors))
        t_ready, info = timed(pool.ready)
        pool.score(blob)  # warm-up: first model build in each actor
        times, result = [], None
        for _ in range(repeats):
            t, result = timed(lambda: pool.score(blob))  # noqa: B023
            times.append(t)
        pool.shutdown()
        best = min(times)
        base = base or best
        reference = reference or result
        print(
            f"| {actors} | {t_ready:.1f} ({info['builds']} builds, {info['hits']} hits) | "
            f"{best:.2f} | {best / base:.2f} | {'yes' if result == reference else 'NO'} |",
            flush=True,
        )


def checkpoint_table(quick: bool, cache: str, blobs: list[dict]) -> None:
    """Cold first checkpoint vs second checkpoint vs first again on a fresh pool, warm cache."""
    print("\n| run | wall s | vs first | corruption builds | cache hits |")
    print("|---|---|---|---|---|")
    rows = []
    pool = ScorerPool.create(experiment(quick, cache, 2))
    t_first, _ = timed(lambda: (pool.ready(), pool.score(blobs[0])))
    rows.append(("first checkpoint, cold cache (start + build + score)", t_first, pool.stats()))
    before = pool.stats()
    t_second, _ = timed(lambda: pool.score(blobs[1]))
    after = pool.stats()
    delta = {k: after[k] - before[k] for k in ("builds", "hits")}
    rows.append(("second checkpoint, same pool (score)", t_second, delta))
    pool.shutdown()
    pool = ScorerPool.create(experiment(quick, cache, 2))
    t_again, _ = timed(lambda: (pool.ready(), pool.score(blobs[0])))
    rows.append(
        ("first checkpoint, new pool, warm cache (start + load + score)", t_again, pool.stats())
    )
    pool.shutdown()
    for name, t, stats in rows:
        print(
            f"| {name} | {t:.2f} | {t / t_first:.2f} | {stats['builds']} | {stats['hits']} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, 10 cells (~1 minute)")
    parser.add_argument("--repeats", type=int, default=None, help="score() calls per pool")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    cpus = os.cpu_count() or 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        exp = experiment(args.quick, cache, 1)
        blobs = checkpoints(exp)
        cells = len(eval_cells(exp.eval))
        print(
            f"ray {ray.__version__}, torch {torch.__version__}, {cpus} CPUs, "
            f"Python {platform.python_version()}; {exp.model.name}, "
            f"{exp.data.test_size} images x {cells} cells (clean included), 1 CPU per actor\n"
        )
        ray.init(num_cpus=max(2, cpus), include_dashboard=False, log_to_driver=False)
        try:
            checkpoint_table(args.quick, cache, blobs)  # first: it needs the cold cache
            print()
            actors_table(args.quick, cache, blobs[1], repeats)
        finally:
            ray.shutdown()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
