"""``clipray data``: write an experiment's dataset (e.g. the synthetic one) to disk, as PNG +
CSV tables or as img2dataset WebDataset shards; or, with ``--preview``, one eval image under
every corruption at severities 1, 3 and 5, as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipray.config.architectures import image_size
from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.paths import check_output_dir, check_output_file
from clipray.config.schema import Experiment
from clipray.core import storage
from clipray.core.data import SPLITS, CaptionedImages, check_images, export_csv, load_split
from clipray.core.shards import write_shards


def cmd_data(args: argparse.Namespace) -> int:
    """Write an experiment's dataset (e.g. the synthetic one) to disk."""
    exp = load_experiment(args.file, args.set)
    if getattr(args, "preview", None) is not None:
        return _preview(exp, args.preview, getattr(args, "index", None))
    if getattr(args, "index", None) is not None:
        raise ConfigError("--index: only with --preview")
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


def _preview(exp: Experiment, target: str, index: int | None) -> int:
    """Write image ``index`` of the scored eval set under every corruption at severities 1, 3
    and 5 to ``target`` (a .png), each cell as the scorer's cache holds it."""
    from clipray.scoring.preview import SEVERITIES, preview_png  # cv2, scikit-image: only here

    path = check_output_file(target, "--preview")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--preview: expected a .png file name, got {path.name!r}")
    split = load_split(exp.data, exp.eval.split).subset(exp.eval.max_images)
    index = 0 if index is None else index
    if not 0 <= index < len(split):
        raise ConfigError(
            f"--index: expected 0..{len(split) - 1} (the scored {exp.eval.split} split has "
            f"{len(split)} images), got {index}"
        )
    image = split.image(index, image_size(exp.model.name))
    caption = f"{exp.eval.split} image {index}: {split.captions[index][0]}"
    storage.write_bytes(str(path), preview_png(image, caption, index, exp.eval.seed))
    print(
        f"{path}: {exp.eval.split} image {index} under every corruption at severities "
        f"{', '.join(map(str, SEVERITIES))}"
    )
    return 0
