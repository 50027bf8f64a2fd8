"""``clipray data``: write an experiment's dataset (e.g. the synthetic one) to disk, as PNG +
CSV tables or as img2dataset WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipray.config.architectures import image_size
from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.paths import check_output_dir
from clipray.core.data import SPLITS, CaptionedImages, check_images, export_csv, load_split
from clipray.core.shards import write_shards


def cmd_data(args: argparse.Namespace) -> int:
    """Write an experiment's dataset (e.g. the synthetic one) to disk."""
    exp = load_experiment(args.file, args.set)
    out = Path(args.out)
    check_output_dir(out, "--out")
    shards = getattr(args, "format", "csv") == "webdataset"
    per_shard = getattr(args, "per_shard", 1000)
    if shards and per_shard < 1:
        raise ConfigError(f"--per-shard: expected a positive number of samples, got {per_shard}")
    taken = [out / s for s in SPLITS] if shards else [out / "images"]
    taken += [out / f"{split}.csv" for split in SPLITS]
    if any(p.exists() for p in taken):
        raise ConfigError(f"{out}: a dataset is already there; choose another --out")
    size = getattr(exp.data, "image_size", None) or image_size(exp.model.name)
    splits = {split: load_split(exp.data, split) for split in SPLITS}
    for data in splits.values():  # every image decodes: nothing is half-written
        check_images(data)
    for split, data in splits.items():
        if shards:
            written = _export_shards(data, out / split, size, per_shard)
            print(f"{split}: {len(written)} shards in {out / split}")
        else:
            print(f"{split}: {export_csv(data, out, split, size)}")
    if shards:
        last = {s: f"{len(_tars(out / s)) - 1:05d}" for s in SPLITS}
        print(
            f"use it with: --set data.kind=webdataset "
            f"--set 'data.train={out}/train/{{00000..{last['train']}}}.tar' "
            f"--set data.train_samples={len(splits['train'])} "
            f"--set 'data.val={out}/val/{{00000..{last['val']}}}.tar' "
            f"--set 'data.test={out}/test/{{00000..{last['test']}}}.tar'"
        )
    else:
        print(
            f"use it with: --set data.kind=csv --set data.train={out}/train.csv "
            f"--set data.val={out}/val.csv --set data.test={out}/test.csv"
        )
    return 0


def _export_shards(data: CaptionedImages, out_dir: Path, size: int, per_shard: int) -> list[Path]:
    """A split as img2dataset shards (JPEG, every caption in the .json) ``kind: webdataset``
    reads back."""
    samples = ((data.image(i, size), data.captions[i]) for i in range(len(data)))
    return write_shards(samples, out_dir, per_shard)


def _tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))
