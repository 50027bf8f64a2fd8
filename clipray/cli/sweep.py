"""``clipray sweep`` and ``clipray resume``: sweeps from the command line (``clipray report``:
:mod:`clipray.cli.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipray.cli.main import DEFAULT_SWEEP
from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace, load_space
from clipray.sweep.driver import run_sweep
from clipray.sweep.manifest import load_plan


def sweep_inputs(
    file: str | None, overrides: list[str], space_path: str | None
) -> tuple[Experiment, SearchSpace]:
    exp = load_experiment(file or DEFAULT_SWEEP, overrides)
    path = Path(space_path) if space_path else exp.sweep.space
    if path is None:
        raise ConfigError("sweep.space: no search space; set it in the sweep file or pass --space")
    if space_path:  # recorded in the config, so --resume sees the same sweep
        exp = exp.model_copy(
            update={"sweep": exp.sweep.model_copy(update={"space": path.resolve()})}
        )
    return exp, load_space(path, exp)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or with --resume continue) a sweep."""
    exp, space = sweep_inputs(args.file, args.set, args.space)
    return 0 if run_sweep(exp, space, resume=args.resume).complete else 1


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue the sweep stored in a directory."""
    exp, space = load_plan(args.directory)
    return 0 if run_sweep(exp, space, resume=True).complete else 1
