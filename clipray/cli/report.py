"""``clipray report``: a sweep's trials (best first, results.csv) and its report (report.md,
report.html and plots), from the sweep directory or from the MLflow store alone."""

from __future__ import annotations

import argparse

from clipray.config.errors import ConfigError
from clipray.config.paths import check_output_dir, check_output_file
from clipray.core import storage
from clipray.sweep.manifest import Plan, saved_plan
from clipray.sweep.report import REPORT, plan_from_mlflow, report, write_study_report


def _plan(args: argparse.Namespace) -> tuple[Plan, bool]:
    """The sweep to report, and whether its directory is here (else: MLflow only)."""
    if args.tracking_uri is None and args.sweep is None:
        if args.directory is None:
            raise ConfigError("report: give a sweep DIRECTORY, or --tracking-uri URI --sweep NAME")
        return saved_plan(args.directory), True
    if args.directory is not None:
        raise ConfigError("report: give a sweep DIRECTORY or --tracking-uri/--sweep, not both")
    if args.tracking_uri is None or args.sweep is None:
        raise ConfigError("report: --tracking-uri and --sweep go together")
    plan, older = plan_from_mlflow(args.tracking_uri, args.sweep)
    if older:
        print(f"{len(older)} older sweep(s) named {args.sweep}: {', '.join(older[:5])}")
    return plan, False


def cmd_report(args: argparse.Namespace) -> int:
    """Every trial of a sweep, best first, from its MLflow runs (results.csv); then the report
    with its statistics and plots, written to a folder and logged on the sweep's parent run."""
    plan, local = _plan(args)
    if args.csv:
        check_output_file(args.csv, "--csv")  # before MLflow is asked anything more
    out_dir = args.out or (None if local else f"report-{plan.sweep_id}")
    if out_dir:
        check_output_dir(out_dir, "--out")
    table, csv_text = report(plan)
    print(table)
    csv_out = args.csv or storage.join(plan.directory if local else out_dir, REPORT)
    storage.write_text(csv_out, csv_text)
    print(f"written: {csv_out}")
    runs = plan.tracking.runs()
    where, built = write_study_report(plan, csv_text, out_dir, runs, local_ranks=local)
    for note in built.notes:
        print(f"note: {note}")
    print(f"report: {storage.join(where, 'report.html')} and report.md, with its plots")
    print(f"report: also on the sweep's MLflow run {runs.parent} (artifacts, report/)")
    return 0
