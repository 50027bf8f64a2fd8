"""``clipray score``: one checkpoint, scored on a pool of Ray actors started here.

Everything is validated (config, weights against the architecture, cache directory, eval split)
before Ray or any actor starts, so bad input writes nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch

from clipray.config import (
    Experiment,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    read_yaml,
)
from clipray.scoring import (
    ScorerPool,
    _get,
    build_weights_model,
    eval_cells,
    load_eval_set,
    resolve_cache_dir,
)


def command_experiment(
    blob: Mapping[str, Any], file: str | None, overrides: list[str], source: str
) -> Experiment:
    """The checkpoint's experiment; ``file``'s storage/data/eval sections and ``--set`` win."""
    if not isinstance(blob.get("config"), Mapping):
        raise ValueError(f"checkpoint {source}: no experiment config inside")
    raw = copy.deepcopy(dict(blob["config"]))
    if file is not None:
        resolved = load_experiment(file).to_dict()  # validated, paths made absolute
        for section in ("storage", "data", "eval"):
            if section in read_yaml(Path(file)):
                raw[section] = resolved[section]
    apply_overrides(raw, overrides)
    return experiment_from_dict(raw, source)


def score_checkpoint(
    exp: Experiment, blob: Mapping[str, Any], progress: bool = True
) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate everything, then score ``blob`` on a pool (starting a local Ray if none is up).

    Returns (flat result, pool info). Nothing is written and no actor starts on bad input.
    """
    from tqdm import tqdm

    resolve_cache_dir(exp)
    eval_cells(exp.eval)
    build_weights_model(blob, exp.model.name)  # fits the architecture?
    eval_set = load_eval_set(exp)
    sc = exp.eval.scorers
    if sc.gpus_per_actor > 0 and not ray.is_initialized() and not torch.cuda.is_available():
        raise ValueError("eval.scorers.gpus_per_actor: > 0 but no CUDA device is visible")
    started = not ray.is_initialized()
    if started:
        cpus = max(1, math.ceil(sc.num_actors * sc.cpus_per_actor))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    pool = None
    try:
        pool = ScorerPool.create(exp, eval_set=eval_set)
        ready = pool.coordinator.ready.remote()
        with tqdm(total=len(eval_cells(exp.eval)), desc="cells", disable=not progress) as bar:
            while not ray.wait([ready], timeout=0.5)[0]:
                if (done := pool.progress()[0]) > bar.n:
                    bar.update(done - bar.n)
            _get(ready)
            bar.update(bar.total - bar.n)
        flat = pool.score(blob)
        return flat, pool.stats()
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
