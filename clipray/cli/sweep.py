"""``clipray sweep``, ``clipray resume`` and ``clipray report``: sweeps from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipray.cli.main import DEFAULT_SWEEP
from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.paths import check_output_file
from clipray.config.schema import Experiment
from clipray.config.space import SearchSpace, load_space
from clipray.core import storage
from clipray.sweep.driver import run_sweep
from clipray.sweep.manifest import load_plan, saved_plan
from clipray.sweep.report import REPORT, report


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


def cmd_report(args: argparse.Namespace) -> int:
    """Every trial of a sweep, best first, from its MLflow runs; also writes results.csv."""
    plan = saved_plan(args.directory)
    if args.csv:
        check_output_file(args.csv, "--csv")  # before MLflow is asked anything
    table, csv_text = report(plan)
    print(table)
    out = args.csv or storage.join(plan.directory, REPORT)
    storage.write_text(out, csv_text)
    print(f"written: {out}")
    return 0
