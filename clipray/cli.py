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


def _looks_like_space(raw: dict[str, Any]) -> bool:
    return bool(raw) and all(isinstance(v, dict) and "type" in v for v in raw.values())


def cmd_check(args: argparse.Namespace) -> int:
    """Validate experiment and search-space files; print each resolved config."""
    from clipray.space import load_space, parse_space

    for name in args.files:
        path = Path(name)
        raw = read_yaml(path)
        if _looks_like_space(raw):
            space = load_space(path)
            print(f"# {path}: search space OK ({len(space.params)} parameters)")
            print(
                yaml.safe_dump(
                    {k: v.model_dump() for k, v in space.params.items()}, sort_keys=False
                )
            )
            continue
        if not raw and path.suffix in (".yaml", ".yml") and "search_spaces" in path.parts:
            parse_space(raw, str(path))  # raises the empty-space error
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
