"""``clipray score``: one checkpoint file, scored on corrupted retrieval by a pool started here.

Everything is validated (config, weights against the architecture, cache directory, eval split,
the ``--json`` destination) before Ray or any actor starts, so bad input writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipray.config.loading import apply_overrides, experiment_from_dict, load_experiment, read_yaml
from clipray.config.paths import check_output_dir, check_output_file
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.core.checkpoint import load_checkpoint
from clipray.scoring.plan import resolve_cache_dir
from clipray.scoring.pool import score_checkpoint
from clipray.scoring.tables import rsum_table, summary_lines


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


def cmd_score(args: argparse.Namespace) -> int:
    """Score one checkpoint file on corrupted retrieval with a local pool of Ray actors."""
    blob = load_checkpoint(Path(args.checkpoint))
    extra = [f"eval.scorers.num_actors={args.actors}"] if args.actors is not None else []
    for key, value in (("corruptions", args.corruptions), ("severities", args.severities)):
        extra += [f"eval.{key}={json.dumps(value)}"] if value is not None else []
    exp = command_experiment(blob, args.file, args.set + extra, args.checkpoint)
    json_out = check_output_file(args.json, "--json") if args.json else None  # before the work
    check_output_dir(resolve_cache_dir(exp), "eval.cache_dir" if exp.eval.cache_dir else "storage")
    flat, info = score_checkpoint(exp, blob, progress=not args.quiet)
    print(rsum_table(flat))
    print("\n".join(summary_lines(flat)))
    print(
        f"# {info['cells']} cells on {info['actors']} actors; corrupted sets built "
        f"{info['builds']}, loaded from cache {info['hits']}",
        file=sys.stderr,
    )
    if json_out is not None:
        storage.write_json(str(json_out.resolve()), flat)
    return 0
