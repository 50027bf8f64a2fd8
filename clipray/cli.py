"""``clipray`` command line: thin wrappers over the library and the orchestration layers.

Exit codes: 0 success, 2 bad input (one line on stderr naming the file/field), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from clipray.config import ConfigError, Experiment, load_experiment, read_yaml

DEFAULT_SWEEP = Path(__file__).resolve().parent.parent / "sweeps" / "default.yaml"


def _looks_like_space(path: Path, raw: dict[str, Any]) -> bool:
    """Search-space files live in search_spaces/ or have dotted top-level keys (config paths)."""
    return "search_spaces" in path.resolve().parts or (
        bool(raw) and all("." in str(k) for k in raw)
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate experiment and search-space files; print each resolved config."""
    from clipray.space import load_space

    for name in args.files:
        path = Path(name)
        raw = read_yaml(path)
        if _looks_like_space(path, raw):
            space = load_space(path)
            print(f"# {path}: search space OK ({len(space.params)} parameters)")
            print(
                yaml.safe_dump(
                    {k: v.model_dump(mode="json") for k, v in space.params.items()}, sort_keys=False
                )
            )
            continue
        exp = load_experiment(path, args.set)
        if exp.sweep.space is not None:
            load_space(exp.sweep.space, exp)
        print(f"# {path}: experiment OK")
        print(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    return 0


def _device(exp: Experiment):
    import torch

    want_gpu = exp.train.use_gpu == "yes" or (
        exp.train.use_gpu == "auto" and torch.cuda.is_available()
    )
    if want_gpu and not torch.cuda.is_available():
        raise ConfigError("train.use_gpu: 'yes' but no CUDA device is visible")
    return torch.device("cuda" if want_gpu else "cpu")


def cmd_train(args: argparse.Namespace) -> int:
    """One training run on this machine, without Ray."""
    from clipray.local import train_locally

    exp = load_experiment(args.file, args.set)
    out = Path(args.out) if args.out else Path(exp.storage) / exp.name / "train"
    metrics = train_locally(exp, out, _device(exp), resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 3) for k, v in metrics.items() if k.startswith("val/")}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score one checkpoint file on corrupted retrieval with a local pool of Ray actors."""
    from clipray import storage
    from clipray.report import rsum_table, summary_lines
    from clipray.score_local import command_experiment, score_checkpoint
    from clipray.train import load_checkpoint

    blob = load_checkpoint(Path(args.checkpoint))
    extra = [f"eval.scorers.num_actors={args.actors}"] if args.actors is not None else []
    for key, value in (("corruptions", args.corruptions), ("severities", args.severities)):
        extra += [f"eval.{key}={json.dumps(value)}"] if value is not None else []
    exp = command_experiment(blob, args.file, args.set + extra, args.checkpoint)
    flat, info = score_checkpoint(exp, blob, progress=not args.quiet)
    print(rsum_table(flat))
    print("\n".join(summary_lines(flat)))
    print(
        f"# {info['cells']} cells on {info['actors']} actors; corrupted sets built "
        f"{info['builds']}, loaded from cache {info['hits']}",
        file=sys.stderr,
    )
    if args.json:
        storage.write_json(str(Path(args.json).resolve()), flat)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Write an experiment's dataset (e.g. the synthetic one) to disk as PNGs + CSV tables."""
    from clipray.data import SPLITS, export_csv, load_split
    from clipray.model import image_size

    exp = load_experiment(args.file, args.set)
    out = Path(args.out)
    if any((out / f"{split}.csv").exists() for split in SPLITS):
        raise ConfigError(f"{out}: a dataset is already there; choose another --out")
    size = getattr(exp.data, "image_size", None) or image_size(exp.model.name)
    for split in SPLITS:
        table = export_csv(load_split(exp.data, split), out, split, size)
        print(f"{split}: {table}")
    print(
        f"use it with: --set data.kind=csv --set data.train={out}/train.csv "
        f"--set data.val={out}/val.csv --set data.test={out}/test.csv"
    )
    return 0


def _sweep_inputs(file: str | None, overrides: list[str], space_path: str | None):
    from clipray.space import load_space

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
    from clipray.sweep import run_sweep

    exp, space = _sweep_inputs(args.file, args.set, args.space)
    return 0 if run_sweep(exp, space, resume=args.resume).complete else 1


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue the sweep stored in a directory."""
    from clipray.sweep import load_plan, run_sweep

    exp, space = load_plan(args.directory)
    return 0 if run_sweep(exp, space, resume=True).complete else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Every trial of a sweep, best first, from its MLflow runs; also writes results.csv."""
    from clipray import storage
    from clipray.sweep import REPORT, report, saved_plan

    plan = saved_plan(args.directory)
    table, csv_text = report(plan)
    print(table)
    out = args.csv or storage.join(plan.directory, REPORT)
    storage.write_text(out, csv_text)
    print(f"written: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_set(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a config field (value parsed as YAML); repeatable",
        )
        return sp

    c = with_set(sub.add_parser("check", help="validate experiment / search-space files"))
    c.add_argument("files", nargs="+")
    c.set_defaults(func=cmd_check)

    t = with_set(sub.add_parser("train", help="train one model on this machine (no Ray)"))
    t.add_argument("file", nargs="?", default=str(DEFAULT_SWEEP))
    t.add_argument("--out", help="output directory (default: <storage>/<name>/train)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = with_set(sub.add_parser("score", help="score a checkpoint on corrupted retrieval (Ray)"))
    s.add_argument("checkpoint", help="a clipray training checkpoint (its config is the default)")
    s.add_argument("file", nargs="?", help="experiment file whose storage/data/eval sections win")
    s.add_argument("--corruptions", nargs="+", metavar="NAME", help="names or groups")
    s.add_argument("--severities", nargs="+", type=int, metavar="K", help="integers 1-5")
    s.add_argument("--actors", type=int, metavar="N", help="scorer actors (eval.scorers)")
    s.add_argument("--json", metavar="OUT", help="also write the flat metrics dict here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)

    d = with_set(sub.add_parser("data", help="write the experiment's dataset to disk (PNG + CSV)"))
    d.add_argument("file", nargs="?", default=str(DEFAULT_SWEEP))
    d.add_argument("--out", required=True, help="directory for images/ and <split>.csv")
    d.set_defaults(func=cmd_data)

    s = with_set(sub.add_parser("sweep", help="run a sweep (default: sweeps/default.yaml)"))
    s.add_argument("file", nargs="?", help="experiment file (default: the built-in default sweep)")
    s.add_argument("--space", help="search space file (default: the file's sweep.space)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("resume", help="continue the sweep stored in DIRECTORY")
    r.add_argument("directory", help="<storage>/<name> of the sweep")
    r.set_defaults(func=cmd_resume)

    r = sub.add_parser("report", help="every trial of the sweep in DIRECTORY, best first")
    r.add_argument("directory", help="<storage>/<name> of the sweep")
    r.add_argument(
        "--csv", metavar="OUT", help="write the CSV here (default: DIRECTORY/results.csv)"
    )
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"clipray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
