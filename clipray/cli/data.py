"""``clipray data``: write an experiment's dataset (e.g. the synthetic one) to disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipray.config.architectures import image_size
from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.paths import check_output_dir
from clipray.core.data import SPLITS, check_images, export_csv, load_split


def cmd_data(args: argparse.Namespace) -> int:
    """Write an experiment's dataset (e.g. the synthetic one) to disk as PNGs + CSV tables."""
    exp = load_experiment(args.file, args.set)
    out = Path(args.out)
    check_output_dir(out, "--out")
    if (out / "images").exists() or any((out / f"{split}.csv").exists() for split in SPLITS):
        raise ConfigError(f"{out}: a dataset is already there; choose another --out")
    size = getattr(exp.data, "image_size", None) or image_size(exp.model.name)
    splits = {split: load_split(exp.data, split) for split in SPLITS}
    for data in splits.values():  # every image decodes: nothing is half-written
        check_images(data)
    for split, data in splits.items():
        table = export_csv(data, out, split, size)
        print(f"{split}: {table}")
    print(
        f"use it with: --set data.kind=csv --set data.train={out}/train.csv "
        f"--set data.val={out}/val.csv --set data.test={out}/test.csv"
    )
    return 0
