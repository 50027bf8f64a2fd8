"""Captioned image datasets: synthetic shapes (built in), CSV/TSV tables, Karpathy JSON splits.

Every dataset kind yields :class:`CaptionedImages` per split: images (in memory, or files read on
demand) and one or more captions per image. Images reach the model as uint8 HxWx3 at the model's
input resolution (shorter side resized, centre-cropped), which is also where corruptions apply.

The synthetic dataset (:mod:`clipray.core.synthetic`) is built in memory from its seed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipray.config.errors import brief, brief_text
from clipray.config.schema import CsvData, KarpathyData, SyntheticData, WebDatasetData
from clipray.core.shards import Member, read_members
from clipray.core.synthetic import SPLITS, synthetic_split


@dataclass
class CaptionedImages:
    """One split. ``images`` is a uint8 NxHxWx3 array, a list of image files or of encoded
    images read from shards (:class:`Member`)."""

    images: np.ndarray | list[Path] | list[Member]
    captions: list[list[str]]
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.captions)} caption lists"
            )
        if any(not c for c in self.captions):
            raise ValueError(f"{self.name}: every image needs at least one caption")

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int, size: int) -> np.ndarray:
        """Image ``i`` as uint8 ``size x size x 3``."""
        if isinstance(self.images, np.ndarray):
            img = self.images[i]
            return img if img.shape[:2] == (size, size) else resize_crop(Image.fromarray(img), size)
        return resize_crop(_open(self.images[i]), size)

    def load_all(self, size: int) -> np.ndarray:
        """All images as one uint8 ``N x size x size x 3`` array (eval sets, small datasets)."""
        if isinstance(self.images, np.ndarray) and self.images.shape[1:3] == (size, size):
            return self.images
        return np.stack([self.image(i, size) for i in range(len(self))])

    def subset(self, n: int | None) -> CaptionedImages:
        if n is None or n >= len(self):
            return self
        return CaptionedImages(self.images[:n], self.captions[:n], self.name)

    def flat_captions(self) -> tuple[list[str], torch.Tensor]:
        """Every caption once, and the index of its image (text -> image ground truth)."""
        texts = [c for caps in self.captions for c in caps]
        owner = [i for i, caps in enumerate(self.captions) for _ in caps]
        return texts, torch.tensor(owner, dtype=torch.long)


def _open(path: Path | Member, how: str = "rgb") -> Image.Image:
    """Image ``path`` as RGB; ``how="decode"``: only decode it (a JPEG at reduced scale, still
    every byte of its stream); ``"header"``: only read its format and size."""
    try:
        with Image.open(io.BytesIO(path.data) if isinstance(path, Member) else path) as im:
            if how == "decode":
                im.draft("RGB", (64, 64))
                im.load()
            return im.convert("RGB") if how == "rgb" else im
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors
        raise ValueError(f"image file unreadable: {path} ({_why(e)})") from None


def _why(e: Exception) -> str:
    """Why PIL could not read an image, in a few words (its messages repeat the path)."""
    if isinstance(e, Image.DecompressionBombError):
        return f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels: a decompression bomb?"
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can decode"
    return "a directory" if isinstance(e, IsADirectoryError) else brief_text(e, 60)


def resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then the centre square — open_clip's eval transform."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _synthetic(cfg: SyntheticData, split: str) -> CaptionedImages:
    images, captions = synthetic_split(cfg, split)
    return CaptionedImages(images, captions, f"synthetic/{split}")


# ------------------------------------------------------------------------------------ real data
def _csv(cfg: CsvData, split: str) -> CaptionedImages:
    table = {"train": cfg.train, "val": cfg.val, "test": cfg.test or cfg.val}[split]
    if not table.is_file():
        raise ValueError(f"data.{split}: file not found: {table}")
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    grouped: dict[str, list[str]] = {}
    line = 1
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            for col in (cfg.image_column, cfg.caption_column):
                if col not in columns:
                    found = ", ".join(brief(c, 30) for c in columns[:6]) or "none: empty file"
                    raise ValueError(f"{table}: missing column {brief(col, 40)} (has {found})")
            for row in reader:
                line = reader.line_num
                image, caption = row[cfg.image_column], row[cfg.caption_column]
                if image is None or caption is None:
                    raise ValueError(f"{table}: line {line}: fewer fields than the header")
                if not image.strip():
                    raise ValueError(f"{table}: line {line}: empty {cfg.image_column}")
                if not caption.strip():
                    raise ValueError(f"{table}: line {line}: empty {cfg.caption_column}")
                grouped.setdefault(image.strip(), []).append(caption.strip())
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{table}: not UTF-8 text (byte 0x{e.object[e.start]:02x} near line {line}); "
            "expected a CSV/TSV table"
        ) from None
    except csv.Error as e:
        raise ValueError(f"{table}: not a valid table (line {line}: {brief_text(e, 60)})") from None
    except OSError as e:
        raise ValueError(f"{table}: cannot be read ({e.strerror or type(e).__name__})") from None
    root = cfg.image_root or table.parent
    return _checked(table, [root / p for p in grouped], list(grouped.values()), split)


def _karpathy(cfg: KarpathyData, split: str) -> CaptionedImages:
    if not cfg.path.is_file():
        raise ValueError(f"data.path: file not found: {cfg.path}")
    expected = f"{cfg.path}: expected a Karpathy JSON with an 'images' list"
    try:
        entries = json.loads(cfg.path.read_bytes().decode("utf-8-sig"))["images"]
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfg.path}: not UTF-8 text (at byte {e.start}); {expected}") from None
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise ValueError(expected) from None
    except OSError as e:
        raise ValueError(f"{cfg.path}: cannot be read ({e.strerror})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{expected}; 'images' is a {type(entries).__name__}")
    wanted = {"train": ("train", "restval")}.get(split, (split,))  # restval trains, by convention
    paths, captions = [], []
    for i, entry in enumerate(entries):
        where = f"{cfg.path}: images[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with filename and sentences")
        if entry.get("split") not in wanted:
            continue
        folder, name = entry.get("filepath", ""), entry.get("filename")
        if not isinstance(name, str) or not name.strip() or not isinstance(folder, str):
            raise ValueError(f"{where}: expected a 'filename' string (and optional 'filepath')")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{where}: expected a non-empty 'sentences' list")
        texts = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise ValueError(f"{where}.sentences[{j}]: expected an object with a 'raw' string")
            if not raw.strip():
                raise ValueError(f"{where}.sentences[{j}]: empty 'raw' caption")
            texts.append(raw.strip())
        paths.append(cfg.image_root / folder / name)
        captions.append(texts)
    return _checked(cfg.path, paths, captions, split)


def _checked(
    source: Path, paths: list[Path], captions: list[list[str]], split: str
) -> CaptionedImages:
    if not paths:
        raise ValueError(f"{source}: the {split} split is empty")
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise ValueError(f"{source}: image file not found: {missing}")
    return CaptionedImages(paths, captions, f"{source.name}/{split}")


# ---------------------------------------------------------------------------------- checking
def check_images(split: CaptionedImages, sample: int | None = None) -> None:
    """Every image of ``split`` decodes (``sample`` None), or, when ``split`` has more than
    ``sample`` images, every header reads and ``sample`` evenly spaced images decode. One-line
    ValueError naming the split and the image. In-memory (synthetic) splits pass as they are."""
    if isinstance(split.images, np.ndarray):
        return
    n = len(split.images)
    try:
        if sample is None or n <= sample:
            for path in split.images:
                _open(path, "decode")
            return
        for path in split.images:
            _open(path, "header")
        for i in np.linspace(0, n - 1, sample).round().astype(int):
            _open(split.images[int(i)], "decode")
    except ValueError as e:
        raise ValueError(f"{split.name}: {e}") from None


def _webdataset(cfg: WebDatasetData, split: str) -> CaptionedImages:
    """A shard set read into memory (encoded): the val/test splits. Training streams instead
    (:mod:`clipray.core.stream`); reading ``train`` here is for small sets (``clipray data``)."""
    patterns = {"train": cfg.train, "val": cfg.val, "test": cfg.test or cfg.val}[split]
    images, captions = read_members(patterns, cfg.caption_field)
    if not images:
        raise ValueError(f"data.{split}: no samples in the shards {brief(str(patterns), 80)}")
    return CaptionedImages(images, captions, f"webdataset/{split}")


DATASETS: dict[str, Callable] = {
    "synthetic": _synthetic,
    "csv": _csv,
    "karpathy": _karpathy,
    "webdataset": _webdataset,
}
DataSection = SyntheticData | CsvData | KarpathyData | WebDatasetData


def load_split(cfg: DataSection, split: str) -> CaptionedImages:
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if cfg.kind not in DATASETS:
        raise ValueError(f"data.kind: unknown kind {cfg.kind!r}; known: {', '.join(DATASETS)}")
    return DATASETS[cfg.kind](cfg, split)


def export_csv(data: CaptionedImages, out_dir: Path, split: str, size: int) -> Path:
    """Write a split to disk: PNG images and a ``<split>.csv`` that ``kind: csv`` reads back.

    PNG is lossless, so a synthetic split exported and re-read as CSV is the same dataset.
    """
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(data)):
        rel = Path("images") / split / f"{i:06d}.png"
        Image.fromarray(data.image(i, size)).save(out_dir / rel)
        rows += [(rel.as_posix(), caption) for caption in data.captions[i]]
    table = out_dir / f"{split}.csv"
    tmp = table.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    tmp.replace(table)
    return table
