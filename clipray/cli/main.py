"""``clipray`` command line: thin wrappers over the library and the orchestration layers.

One module per command family (``check``, ``train``, ``score``, ``data``, ``sweep``, ``report``);
a command's module is imported only when that command runs, so ``clipray check`` never imports Ray.
Exit codes: 0 success, 2 bad input (one line on stderr naming the file/field), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipray.config.errors import ConfigError, StoppedError

# The default sweep ships inside the package, so it is there after a plain `pip install`.
DEFAULT_SWEEP = Path(__file__).resolve().parent.parent / "defaults" / "sweeps" / "default.yaml"


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """``clipray.cli.<module>.<name>``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"clipray.cli.{module}"), name)(args)

    return run


def _with_set(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field (value parsed as YAML); repeatable",
    )
    return sp


def _add_run_commands(sub: Any) -> None:
    """check, train, score, data: one file or checkpoint, on this machine."""
    c = _with_set(sub.add_parser("check", help="validate experiment / search-space files"))
    c.add_argument("files", nargs="+")
    c.set_defaults(func=_command("check", "cmd_check"))

    t = _with_set(sub.add_parser("train", help="train one model on this machine (no Ray)"))
    t.add_argument("file", nargs="?", default=str(DEFAULT_SWEEP))
    t.add_argument("--out", help="output directory (default: <storage>/<name>/train)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_command("train", "cmd_train"))

    s = _with_set(sub.add_parser("score", help="score a checkpoint on corrupted retrieval (Ray)"))
    s.add_argument("checkpoint", help="a clipray training checkpoint (its config is the default)")
    s.add_argument("file", nargs="?", help="experiment file whose storage/data/eval sections win")
    s.add_argument("--corruptions", nargs="+", metavar="NAME", help="names or groups")
    s.add_argument("--severities", nargs="+", type=int, metavar="K", help="integers 1-5")
    s.add_argument("--actors", type=int, metavar="N", help="scorer actors (eval.scorers)")
    s.add_argument("--json", metavar="OUT", help="also write the flat metrics dict here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_command("score", "cmd_score"))

    d = _with_set(sub.add_parser("data", help="write the experiment's dataset to disk"))
    d.add_argument("file", nargs="?", default=str(DEFAULT_SWEEP))
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="directory for the dataset")
    what.add_argument(
        "--preview",
        metavar="PNG",
        help="instead: draw one eval image under every corruption at severities 1, 3, 5 here",
    )
    d.add_argument("--index", type=int, metavar="N", help="with --preview: which image (0)")
    d.add_argument(
        "--format",
        choices=("csv", "webdataset"),
        default="csv",
        help="csv: images/ + <split>.csv (PNG); webdataset: <split>/NNNNN.tar shards (JPEG)",
    )
    d.add_argument("--per-shard", type=int, default=1000, metavar="N", help="samples per tar")
    d.set_defaults(func=_command("data", "cmd_data"))


def _add_sweep_commands(sub: Any) -> None:
    """sweep, resume, report: a sweep and its directory."""
    s = _with_set(sub.add_parser("sweep", help="run a sweep (default: sweeps/default.yaml)"))
    s.add_argument("file", nargs="?", help="experiment file (default: the built-in default sweep)")
    s.add_argument("--space", help="search space file (default: the file's sweep.space)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    s.set_defaults(func=_command("sweep", "cmd_sweep"))

    r = sub.add_parser("resume", help="continue the sweep stored in DIRECTORY")
    r.add_argument("directory", help="<storage>/<name> of the sweep")
    r.set_defaults(func=_command("sweep", "cmd_resume"))

    r = sub.add_parser(
        "report", help="a sweep's trials, best first, and its report: statistics and plots"
    )
    r.add_argument("directory", nargs="?", help="<storage>/<name> of the sweep")
    r.add_argument("--tracking-uri", metavar="URI", help="read the sweep from this MLflow store")
    r.add_argument("--sweep", metavar="NAME", help="with --tracking-uri: the sweep's id or name")
    r.add_argument(
        "--csv", metavar="OUT", help="write the CSV here (default: DIRECTORY/results.csv)"
    )
    r.add_argument(
        "--out",
        metavar="DIR",
        help="write report.md, report.html and the plots here "
        "(default: DIRECTORY/report; from MLflow: ./report-<sweep id>)",
    )
    r.set_defaults(func=_command("report", "cmd_report"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_sweep_commands(sub)
    return p


MAX_ERROR = 1000  # characters; messages quote user values bounded, this is the last fence


def _one_line(message: str) -> str:
    """An error message as one line of bounded length, whatever raised it."""
    line = " ".join(message.split())
    return line if len(line) <= MAX_ERROR else line[: MAX_ERROR - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"clipray: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except StoppedError as e:
        print(f"clipray: stopped: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clipray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
