"""``clipray check``: validate experiment and search-space files and print them resolved."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from clipray.config.loading import load_experiment, read_yaml
from clipray.config.space import largest_batch, load_space
from clipray.core.datacheck import check_dataset


def _looks_like_space(path: Path, raw: dict[str, Any]) -> bool:
    """Search-space files live in search_spaces/ or have dotted top-level keys (config paths)."""
    return "search_spaces" in path.resolve().parts or (
        bool(raw) and all("." in str(k) for k in raw)
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate experiment and search-space files (and an experiment's data); print each
    resolved config."""
    for name in args.files:
        path = Path(name)
        raw = read_yaml(path, allow_empty=True)  # an empty experiment file is refused below
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
        space = load_space(exp.sweep.space, exp) if exp.sweep.space is not None else None
        check_dataset(exp, largest_batch(exp, space), remote=False)  # offline: no bucket
        print(f"# {path}: experiment OK")
        print(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    return 0
